"""Calibration: stream samples through the float model, observe activation ranges.

Returns one :class:`ActivationRange` per requested tensor.  Only one batch of
intermediate tensors is alive at a time, and batches are sized so that it stays within
``runtime.BATCH_OUTPUT_LIMIT``.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import onnx

from .calib_data import CalibrationSet
from .config import CalibConfig
from .errors import QwtError, failed_node
from .observers import ActivationRange, make_observer
from .runtime import BatchRunner, make_session, per_sample, with_outputs

logger = logging.getLogger(__name__)


def collect_ranges(model: onnx.ModelProto, tensors: list[str], data: CalibrationSet, cfg: CalibConfig,
                   progress: Callable[[int, int | None], None] | None = None) -> dict[str, ActivationRange]:
    """``progress(n, total)`` is called after each batch of n samples (total may be None)."""
    if not tensors:
        return {}
    session = make_session(with_outputs(model, tensors), optimized=True)
    observers = {t: make_observer(cfg.method, cfg.percentile) for t in tensors}
    seen = 0
    samples = data if cfg.max_samples is None else data.take(0, cfg.max_samples)
    try:
        for (outputs,), n in BatchRunner(session, cfg.batch_size).run(samples, tensors):
            for name, value in outputs.items():
                for chunk in per_sample(value, n):  # sample by sample: the same ranges whatever the batch size
                    observers[name].update(chunk)
            seen += n
            if progress:
                progress(n, samples.length)
    except QwtError:
        raise
    except Exception as e:
        raise QwtError("the float model failed on a calibration sample",
                       notes=[f"after {seen} samples", f"{type(e).__name__}: {str(e)[:300]}"],
                       fix="check that the calibration data has the model's input shapes and value ranges",
                       node=failed_node(str(e))) from None
    logger.info("calibrated %d tensors on %d samples (%s)", len(tensors), seen, cfg.method)
    return {t: ActivationRange(t, *obs.range(), cfg.method) for t, obs in observers.items()}
