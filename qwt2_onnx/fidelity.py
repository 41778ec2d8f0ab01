"""Float vs quantized output fidelity, simulated and as deployed.

*simulated*: onnxruntime with graph optimizations off (every Q/DQ runs as
written, in float).  *deployed*: optimizations on, as users run it (QDQ groups
become integer kernels).  Both are compared to the float model per output.
"""
from __future__ import annotations

import dataclasses

import onnx

from .calib_data import CalibrationSet
from .metrics import ErrorStats
from .runtime import batches, make_session


@dataclasses.dataclass
class FidelityReport:
    simulated: dict[str, ErrorStats]
    deployed: dict[str, ErrorStats]
    samples: int
    held_out: bool
    baseline: dict[str, ErrorStats] | None = None  # the plain QDQ model (no CWAC), simulated


def measure_fidelity(float_model: onnx.ModelProto, qmodel: onnx.ModelProto, data: CalibrationSet,
                     batch_size: int, held_out: bool, baseline: onnx.ModelProto | None = None) -> FidelityReport:
    ref = make_session(float_model, optimized=True)
    sessions = {"simulated": make_session(qmodel, optimized=False), "deployed": make_session(qmodel, optimized=True)}
    if baseline is not None:
        sessions["baseline"] = make_session(baseline, optimized=False)
    names = [o.name for o in ref.get_outputs()]
    stats = {kind: {n: ErrorStats() for n in names} for kind in sessions}
    count = 0
    for feed, n in batches(data, 1):
        r = ref.run(names, feed)
        for kind, sess in sessions.items():
            for name, a, b in zip(names, r, sess.run(names, feed)):
                stats[kind][name].update(a, b)
        count += n
    return FidelityReport(stats["simulated"], stats["deployed"], count, held_out, stats.get("baseline"))
