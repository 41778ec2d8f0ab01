"""What a compile does differently with ``--ray`` (docs/DISTRIBUTED.md): the checks before any work, and the
shard pools of the calibrate and cwac_fit stages.  Ray itself is imported only when a pool is made, so a
compile without ``--ray`` never imports it."""
from __future__ import annotations

import importlib.util
import logging
import os

from .calib_data import CalibrationSet
from .calibrate import collect_ranges
from .config import CompileConfig
from .errors import QwtError

logger = logging.getLogger(__name__)


def calib_source(calib) -> str | None:
    return str(calib) if isinstance(calib, (str, os.PathLike)) else None


def check_ray(config: CompileConfig, calib) -> None:
    """``--ray``: the shard workers read the calibration data themselves (``pre``, an image folder's
    preprocessing, goes with them), so it must be a path, and the extra must be installed — both checked
    before any work."""
    if config.ray_address is None:
        return
    if calib_source(calib) is None:
        raise QwtError("--ray needs the calibration data as a path every node of the cluster can read",
                       notes=[f"got {type(calib).__name__}"], fix="pass --calib PATH on storage the nodes share")
    if importlib.util.find_spec("ray") is None:
        raise QwtError("--ray needs Ray, which is not installed", fix="pip install 'qwt2-onnx[ray]'")


class ShardProgress:
    """One progress count over every shard call of a ``--ray`` compile (calibration passes, then each fit
    stage of each candidate target), reported to the caller's ``progress(n, total)``."""

    def __init__(self, progress, config: CompileConfig, stages: int):
        passes = 1 if config.calib.method == "minmax" else 2
        candidates = 2 if config.cwac.enabled and config.cwac.target == "auto" else int(config.cwac.enabled)
        self.progress, self.total = progress, config.ray_workers * (passes + stages * candidates)

    def __call__(self, n: int = 1) -> None:
        if self.progress is not None:
            self.progress(n, self.total)


def sharded_ranges(float_model, tensors: list[str], calib_part: CalibrationSet, config: CompileConfig, progress,
                   source: str | None, shard_progress: ShardProgress | None = None, pre=None) -> dict:
    """The calibrate stage: in this process, or (``--ray``) over shards with the same result
    (``calib_shards``); a model that cannot run a batch is calibrated here."""
    if config.ray_address is not None and tensors:  # ray is imported only here and in fit_shards
        from .calib_shards import collect_ranges_sharded
        from .ray_shards import RayCalibration

        pool = RayCalibration(config.ray_address, source, calib_part.specs, progress=shard_progress, pre=pre)
        ranges = collect_ranges_sharded(float_model, tensors, calib_part, config.calib, pool, config.ray_workers)
        if ranges is not None:
            return ranges
        logger.info("a calibration batch did not run on a shard: calibrating in this process")
    return collect_ranges(float_model, tensors, calib_part, config.calib, progress)


def fit_shards(config: CompileConfig, source: str | None, calib_part: CalibrationSet,
               shard_progress: ShardProgress | None = None, pre=None):
    """The CWAC fit's shard pool for ``--ray`` (None without it: the fit runs in this process)."""
    if config.ray_address is None:
        return None
    from .ray_shards import RayShards

    return RayShards(config.ray_address, config.ray_workers, source, calib_part.specs, calib_part.length,
                     progress=shard_progress, pre=pre)
