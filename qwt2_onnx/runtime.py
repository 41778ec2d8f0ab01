"""onnxruntime sessions and batched execution shared by calibration and checks."""
from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import onnx
import onnxruntime as ort

from .calib_data import Feed
from .errors import QwtError
from .model_io import runnable

logger = logging.getLogger(__name__)


def make_session(model: onnx.ModelProto | str, optimized: bool = True, threads: int = 0,
                 arena: bool = True) -> ort.InferenceSession:
    """A CPU session; ``optimized=False`` is float simulation (no QDQ fusion).  ``arena=False``: onnxruntime
    returns a run's buffers when the run ends instead of keeping them for the next (for sessions that live
    side by side: each arena grows to its largest run and stays there)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    so.log_severity_level = 3
    so.enable_cpu_mem_arena = arena
    if threads:
        so.intra_op_num_threads = threads
    try:
        if isinstance(model, str):
            return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        with runnable(model) as src:
            return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise QwtError("onnxruntime cannot load the model",
                       notes=[f"{type(e).__name__}: {str(e)[:400]}"],
                       fix="check that the model runs in onnxruntime before quantizing it") from None


def with_outputs(model: onnx.ModelProto, tensors: Iterable[str] | dict[str, int]) -> onnx.ModelProto:
    """A copy of ``model`` that also returns ``tensors`` as graph outputs.  Element types: the given ones
    (a name -> TensorProto type dict), else the model's value_info, else float."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    existing = {o.name for o in m.graph.output}
    types = {vi.name: vi.type.tensor_type.elem_type for vi in m.graph.value_info}
    if isinstance(tensors, dict):
        types.update(tensors)
    for name in tensors:
        if name not in existing:
            m.graph.output.append(onnx.helper.make_tensor_value_info(
                name, types.get(name, onnx.TensorProto.FLOAT), None))
            existing.add(name)
    return m


BATCH_OUTPUT_LIMIT = 64 * 2**20  # bytes of fetched outputs per batch: docs/COMPILE_MEMORY.md


def batch_size_within(samples: Iterable[Feed], requested: int, run: Callable[[Feed], Iterable[np.ndarray]],
                      limit: int | None = None) -> int:
    """The batch size, at most ``requested``, that the model accepts and whose fetched outputs stay within
    ``limit`` bytes (``BATCH_OUTPUT_LIMIT``), measured by running ``run`` on the first two samples of
    ``samples`` (re-iterable: a :class:`CalibrationSet` or a list) as one batch.

    Every stage that batches samples sizes its batches here, so a model that cannot take a batch — a batch
    dimension fixed at 1 in its inputs (the most common export) or inside the graph (a Reshape to
    [1, ...]) — runs one sample at a time everywhere, whatever ``--batch-size`` says.

    Calibration and the checks fetch every intermediate tensor: on ppocr_det (512x512 inputs, 123 MiB
    of them per sample) a batch of 8 raised the process's memory by 3.2 GB during calibration and was
    no faster than one sample at a time (onnxruntime's own buffers grow with the batch too)."""
    limit = BATCH_OUTPUT_LIMIT if limit is None else limit
    if requested <= 1:
        return max(1, requested)
    first = list(itertools.islice(iter(samples), 2))
    if not first:
        return requested
    pair = next(batches(first, 2))
    try:
        per_sample = sum(o.nbytes for o in run(pair[0])) / pair[1]
    except Exception as e:  # noqa: BLE001  (onnxruntime: "Got invalid dimensions for input", or a kernel's shape error)
        if pair[1] == 1:
            raise
        logger.info("the model does not run on a batch of 2 samples (%s); running one sample at a time",
                    str(e).splitlines()[0][:200])
        return 1
    return max(1, min(requested, int(limit // max(per_sample, 1))))


def batches(samples: Iterable[Feed], batch_size: int) -> Iterator[tuple[Feed, int]]:
    """Concatenate consecutive same-shaped samples into batches of up to ``batch_size`` along axis 0; a
    sample any of whose inputs has no leading axis of 1 (a scalar, a state [2, 1, 128]) runs alone."""
    pending: list[Feed] = []

    def flush() -> tuple[Feed, int]:
        feed = {k: np.concatenate([p[k] for p in pending]) if len(pending) > 1 else pending[0][k] for k in pending[0]}
        return feed, len(pending)

    for s in samples:
        if not all(v.ndim and v.shape[0] == 1 for v in s.values()):  # no batch axis of 1 to concatenate on
            if pending:
                yield flush()
                pending = []
            yield s, 1
            continue
        if pending and ({k: v.shape for k, v in s.items()} != {k: v.shape for k, v in pending[0].items()}
                        or len(pending) >= batch_size):
            yield flush()
            pending = []
        pending.append(s)
    if pending:
        yield flush()


def per_sample(x: np.ndarray, n: int) -> list[np.ndarray]:
    """A batch-major tensor of ``n`` samples split into its ``n`` per-sample chunks along axis 0 (one chunk,
    the tensor itself, where axis 0 does not divide into ``n``).  Statistics fed chunk by chunk, in sample
    order, are the same whatever the batch size — ``--batch-size`` is a memory knob only (DESIGN.md §8)."""
    if n <= 1 or x.ndim == 0 or x.shape[0] % n:
        return [x]
    k = x.shape[0] // n
    return [x[i * k:(i + 1) * k] for i in range(n)]


def paired_runs(samples: Iterable[Feed], batch_size: int, runs: list[tuple[ort.InferenceSession, list[str]]],
                ) -> Iterator[tuple[Feed, list[dict[str, np.ndarray]]]]:
    """The one loop of every comparison: each (session, output names) of ``runs`` on the same batches, in
    that order; yields (feed, [each session's outputs by name]).  Batches are sized for all the runs
    together (:func:`batch_size_within`); ``samples`` is iterated twice when ``batch_size`` > 1."""
    size = batch_size_within(samples, batch_size, lambda f: [o for s, names in runs for o in s.run(names, f)])
    for feed, _ in batches(samples, size):
        yield feed, [dict(zip(names, s.run(names, feed))) for s, names in runs]


class BatchRunner:
    """Runs one or more sessions on the same batches; falls back to one sample at a
    time when a model cannot take a batch (fixed batch dims inside the graph)."""

    def __init__(self, sessions: ort.InferenceSession | list[ort.InferenceSession], batch_size: int):
        self.sessions = sessions if isinstance(sessions, list) else [sessions]
        self.batch_size = batch_size

    def run(self, samples: Iterable[Feed], outputs: list[str]) -> Iterator[tuple[list[dict[str, np.ndarray]], int]]:
        """Yields ([outputs of each session], number of samples in the batch).  ``samples`` is iterated
        twice (the first sample sizes the batches: :func:`batch_size_within`)."""
        size = batch_size_within(samples, self.batch_size, lambda f: [o for s in self.sessions for o in s.run(outputs, f)])
        for feed, n in batches(samples, size):
            if self.batch_size > 1:
                try:
                    yield [dict(zip(outputs, s.run(outputs, feed))) for s in self.sessions], n
                    continue
                except Exception:
                    if n == 1:
                        raise
                    logger.info("model does not run on a batch of %d; running samples one by one", n)
                    self.batch_size = 1
            for i in range(n):
                single = {k: v[i:i + 1] for k, v in feed.items()}
                yield [dict(zip(outputs, s.run(outputs, single))) for s in self.sessions], 1


def try_run(model: onnx.ModelProto, feed: dict) -> list | None:
    """``model``'s graph outputs on ``feed`` (optimized session), or None where it does not run (logged: the
    stage that needs the model to run reports it)."""
    names = [o.name for o in model.graph.output]
    try:
        return make_session(model, optimized=True).run(names, feed)
    except Exception as e:  # noqa: BLE001  (onnxruntime raises many kinds; the calibrate stage reports them)
        logger.info("the model did not run on a sample: %s", str(e)[:200])
        return None
