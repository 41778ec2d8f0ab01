"""Stage workers as Ray actors (``qwt2-onnx compile --ray ADDRESS``; the ``[ray]`` extra).  The only module that
imports ray, and only a compile given ``--ray`` imports it.

Each actor reads its shard of the calibration samples itself, from the path every node can read (the driver
never ships data), builds the fit's graphs from the two models (sent once per candidate target) and keeps its
samples' stage-boundary tensors between stages (``cwac.fit.StageWorker``).  Per stage the driver sends the
compensations the previous stage kept and gets back per-sample channel-sum terms (``cwac.shards``).

Faults: an actor that dies (its process killed, its node lost) is replaced by a fresh one that replays the
stages so far — the same calls with the same compensations, deterministic — and is asked again, up to
``retries`` times per call; the result is the same model.  When retries run out the compile fails with a
``QwtError`` (exit 2) and, like every failed compile, writes nothing.
"""
from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Callable
from pathlib import Path

import ray
from ray.exceptions import RayActorError, RayTaskError

from .calib_data import InputSpec, open_calibration
from .calib_shards import CalibShard
from .config import CwacConfig
from .cwac.fit import StageWorker
from .cwac.graphs import FitGraphs
from .cwac.gate import FIT_BATCH, Parts
from .cwac.shards import positions, shard_bounds
from .errors import QwtError
from .policy import QuantPlan

logger = logging.getLogger(__name__)


class ShardActor:
    """One shard's stage worker, inside a Ray actor (wrapped by ``ray.remote`` in :class:`RayShards`).  It is
    built on the first call, not in the constructor: a worker that cannot read its data then fails that call
    with the ``QwtError`` saying why (exit 2), where a failed constructor would look like a dead actor."""

    def __init__(self, float_model: bytes, qmodel: bytes, plan: QuantPlan, cfg: CwacConfig, target: str,
                 heads: set[str], source: str, specs: list[InputSpec], pre, n_calib: int, lo: int, hi: int):
        self.args, self._worker = (float_model, qmodel, plan, cfg, target, heads, source, specs, pre, n_calib,
                                   lo, hi), None

    @property
    def worker(self) -> StageWorker:
        if self._worker is None:
            import onnx

            float_model, qmodel, plan, cfg, target, heads, source, specs, pre, n_calib, lo, hi = self.args
            data = open_calibration(source, specs, pre).take(0, n_calib)
            data.length = n_calib
            parts = Parts.split(data, cfg, FIT_BATCH)
            graphs = FitGraphs(onnx.load_from_string(float_model), onnx.load_from_string(qmodel), plan, target)
            self._worker = StageWorker(graphs, cfg, heads, parts, lo, hi)
        return self._worker

    def stage(self, k: int, kept: list) -> object:
        return self.worker.stage(k, kept)

    def head_errors(self, maps: dict) -> dict:
        return self.worker.head_errors(maps)

    def pid(self) -> int:
        return os.getpid()

    def peak_rss_mib(self) -> float:
        """This worker process's peak resident memory (VmHWM)."""
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024

    def close(self) -> None:
        if self._worker is not None:
            self._worker.close()


class CalibActor:
    """One shard's calibration passes (``calib_shards.CalibShard``), inside a Ray actor."""

    def __init__(self, model: bytes, tensors: list[str], source: str, specs: list[InputSpec], pre, n: int,
                 size: int, lo: int, hi: int):
        self.args, self._shard = (model, tensors, source, specs, pre, n, size, lo, hi), None

    @property
    def shard(self) -> CalibShard:
        """Built on the first call, as :class:`ShardActor`'s worker is (why: there)."""
        if self._shard is None:
            import onnx

            model, tensors, source, specs, pre, n, size, lo, hi = self.args
            data = open_calibration(source, specs, pre).take(0, n)
            data.length = n
            self._shard = CalibShard(onnx.load_from_string(model), tensors, data, size, lo, hi)
        return self._shard

    def extremes(self):
        return self.shard.extremes()

    def histograms(self, amax, final):
        return self.shard.histograms(amax, final)


class RayCalibration:
    """The calibration shards as Ray actors (``calib_shards.collect_ranges_sharded``'s pool); an actor that
    dies is replaced and its call repeated (the passes keep no state), up to ``retries`` times."""

    def __init__(self, address: str, source: str | Path, specs: list[InputSpec], retries: int = 2,
                 progress: Callable | None = None, pre=None):
        _connect(address)
        self.progress, self.pre = progress, pre
        self.remote = ray.remote(max_restarts=0)(CalibActor)
        self.source, self.specs, self.retries = str(source), specs, retries
        self.moved: list[dict] = []

    def start(self, model, tensors, data, size, bounds) -> list:
        n = data.length if data.length is not None else sum(1 for _ in data)
        self.spec = (model.SerializeToString(), tensors, self.source, self.specs, self.pre, n, size)
        self.bounds = bounds
        return [self.remote.remote(*self.spec, lo, hi) for lo, hi in bounds]

    def gather(self, actors: list, method: str, *args) -> list:
        return self.gather_each(actors, method, [args] * len(actors))

    def gather_each(self, actors: list, method: str, args: list[tuple]) -> list:
        def restart(i: int):
            actors[i] = self.remote.remote(*self.spec, *self.bounds[i])  # the passes keep no state
            return getattr(actors[i], method).remote(*args[i])

        out = _results([getattr(a, method).remote(*x) for a, x in zip(actors, args)], restart, self.retries,
                       "calibration shard worker", self.progress)
        self.moved.append({"call": method, "sent_bytes": sum(len(pickle.dumps(x)) for x in args),
                           "received_bytes": sum(len(pickle.dumps(r)) for r in out)})
        return out

    def stop(self, actors: list) -> None:
        for a in actors:
            ray.kill(a)


def _results(refs: list, restart: Callable, retries: int, what: str, progress: Callable | None) -> list:
    """``ray.get`` of each ref in order; a dead actor's ref is replaced by ``restart(i)`` (a fresh actor's
    call) up to ``retries`` times, then the run fails with a ``QwtError``.  ``progress(1)`` per result."""
    out = []
    for i, ref in enumerate(refs):
        for attempt in range(retries + 1):
            try:
                out.append(_get(ref))
                break
            except RayActorError as e:
                if attempt == retries:
                    raise QwtError(f"{what} {i} of the Ray cluster died {retries + 1} times",
                                   notes=[f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"],
                                   fix="check the nodes' memory and logs (ray status); nothing was written") from None
                ref = restart(i)
        if progress is not None:
            progress(1)
    return out


def _get(ref):
    """``ray.get``; a ``QwtError`` raised in a worker (its data unreadable on its node, say) is raised here as
    it is, so the run ends as any bad input does (exit 2), not as a bug."""
    try:
        return ray.get(ref)
    except RayTaskError as e:
        if isinstance(e.cause, QwtError):
            raise e.cause from None
        raise


def _connect(address: str) -> None:
    if ray.is_initialized():
        return
    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    except Exception as e:  # noqa: BLE001  (ConnectionError, or whatever ray raises for a bad address)
        raise QwtError(f"cannot connect to the Ray cluster at {address}", notes=[f"{type(e).__name__}: {str(e)[:200]}"],
                       fix="start one (ray start --head) and pass its address, e.g. --ray 127.0.0.1:6379") from None


class RayShards:
    """A pool of ``workers`` shard actors on the Ray cluster at ``address`` over the calibration samples
    ``[0, n_calib)`` of ``source``.  ``moved``: bytes sent and received per call, for docs/DISTRIBUTED.md.
    ``after_call(pool, calls)``: a test hook run after each gathered call (the fault test kills an actor)."""

    def __init__(self, address: str, workers: int, source: str | Path, specs: list[InputSpec], n_calib: int,
                 retries: int = 2, after_call: Callable | None = None, progress: Callable | None = None,
                 pre=None):
        _connect(address)
        self.progress, self.pre = progress, pre
        self.remote = ray.remote(max_restarts=0)(ShardActor)  # Ray's default: a CPU to place it, none held
        self.workers, self.source, self.specs, self.n_calib = workers, str(source), specs, n_calib
        self.retries, self.after_call = retries, after_call
        self.moved: list[dict] = []
        self.replacements = 0
        self.worker_peak_rss_mib: list[float] = []

    def start(self, float_model, qmodel, plan, cfg, target, heads, parts: Parts) -> list:
        self.spec = (float_model.SerializeToString(), qmodel.SerializeToString(), plan, cfg, target, heads,
                     self.source, self.specs, self.pre, self.n_calib)
        self.bounds = shard_bounds(positions(parts), self.workers)
        self.history: list[tuple] = []
        return [self._actor(lo, hi) for lo, hi in self.bounds]

    def _actor(self, lo: int, hi: int):
        return self.remote.remote(*self.spec, lo, hi)

    def gather(self, workers: list, method: str, *args) -> list:
        """Every worker's result of ``method(*args)``, in worker order, computed in parallel."""
        sent = len(pickle.dumps(args)) * len(workers)
        def restart(i: int):
            logger.warning("shard worker %d died; replaying %d call(s) on a fresh one", i, len(self.history))
            workers[i] = self._actor(*self.bounds[i])
            self.replacements += 1
            for m, a in self.history:
                _get(getattr(workers[i], m).remote(*a))
            return getattr(workers[i], method).remote(*args)

        results = _results([getattr(w, method).remote(*args) for w in workers], restart, self.retries,
                           "shard worker", self.progress if method == "stage" else None)
        if method == "stage":
            self.history.append((method, args))
        self.moved.append({"call": method, "sent_bytes": sent,
                           "received_bytes": sum(len(pickle.dumps(r)) for r in results)})
        if self.after_call is not None:
            self.after_call(self, workers, len(self.moved))
        return results

    def stop(self, workers: list) -> None:
        """Ends the actors (their peak RSS recorded first in ``worker_peak_rss_mib``)."""
        try:
            self.worker_peak_rss_mib = ray.get([w.peak_rss_mib.remote() for w in workers])
        except RayActorError:
            self.worker_peak_rss_mib = []
        for w in workers:
            try:
                ray.get(w.close.remote())
            except RayActorError:
                pass
            ray.kill(w)
