"""The CWAC output gate's measure: how far a model's outputs are from the float model's.

``fit_compensations`` scores each candidate (global, local, no compensation)
with :func:`output_error` on the held-out calibration samples and keeps the
lowest.
"""
from __future__ import annotations

import numpy as np
import onnx

from .calib_data import CalibrationSet
from .runtime import batches, make_session, with_outputs

_SATURATING = ("Softmax", "Sigmoid", "LogSoftmax")
_SHAPE_ONLY = ("Identity", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten")


def gate_tensors(model: onnx.ModelProto) -> list[str]:
    """What the output gate compares: each graph output, or, when it is a Softmax / Sigmoid (up to reshapes),
    that op's input.  A saturated probability hides the error of every confidently classified sample, so on
    a small held-out set the output error would rest on one or two samples; the logits carry all of them."""
    producer = {o: n for n in model.graph.node for o in n.output}
    names = []
    for out in model.graph.output:
        t = out.name
        while t in producer and producer[t].op_type in _SHAPE_ONLY:
            t = producer[t].input[0]
        names.append(producer[t].input[0] if t in producer and producer[t].op_type in _SATURATING else out.name)
    return list(dict.fromkeys(names))


def output_error(float_model: onnx.ModelProto, model: onnx.ModelProto, data: CalibrationSet, batch_size: int) -> float:
    """Σ over :func:`gate_tensors` of MSE(model, float) / mean(float²), simulated, on ``data``."""
    names = gate_tensors(float_model)
    ref = make_session(with_outputs(float_model, names), optimized=True)
    cand = make_session(with_outputs(model, names), optimized=False)
    err = {n: 0.0 for n in names}
    power = {n: 0.0 for n in names}
    for feed, _ in batches(data, batch_size):
        for n, r, c in zip(names, ref.run(names, feed), cand.run(names, feed)):
            r64, c64 = r.astype(np.float64), c.astype(np.float64)
            err[n] += float(np.sum((c64 - r64) ** 2))
            power[n] += float(np.sum(r64 ** 2))
    return float(sum(err[n] / max(power[n], 1e-30) for n in names))
