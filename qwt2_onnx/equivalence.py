"""Fused vs unfused CWAC graphs: do they compute the same function?

The fold changes only weight DQ scales, integer weight signs and biases, so
the two graphs differ by float rounding (~1e-7 relative per layer).  In a
graph with activation quantizers, such a difference flips the rounding of
the rare activation that lies within rounding distance of a .5 tie; one
flipped code (1 LSB) then propagates downstream.  The comparison therefore
has two parts, both in float simulation (onnxruntime, optimizations off):

* **forced**: every activation QuantizeLinear of both graphs is replaced by
  the integer codes the *unfused* graph produced on the same input, so both
  graphs see identical quantized activations.  What remains is the fold
  itself: any error in a folded scale, sign or bias shows here, at the layer
  that has it, while float rounding does not accumulate across layers::

      unfused:  ... ─► Q ─► codes ─► DQ ─► layer ─► Mul(g) ─► Add(β) ─► ...
      fused:    ... ─►      codes ─► DQ ─► layer' ─► ...     (codes fed in)

* **free-running**: both graphs run on their own; the number of activation
  codes that differ (tie flips), and the resulting output difference.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from onnx import helper

from .calib_data import CalibrationSet
from .runtime import batches, make_session


@dataclasses.dataclass
class FoldCheck:
    forced_max_rel: dict[str, float]  # output -> max|fused − unfused| / max|unfused|, same activation codes
    forced_quantizer_max_rel: dict[str, float]  # the same at each activation quantizer's float input
    free_max_rel: dict[str, float]  # output -> the same, each graph running free
    codes: int  # activation codes compared (free-running)
    flipped: int  # of which differ between the graphs
    max_code_diff: int  # in LSBs

    @property
    def worst_forced(self) -> float:
        return max([*self.forced_max_rel.values(), *self.forced_quantizer_max_rel.values()], default=0.0)


def _activation_quantizers(model: onnx.ModelProto) -> dict[str, tuple[int, str]]:
    """Output name -> (elem type, float input name) of every QuantizeLinear of a non-constant tensor."""
    consts = {t.name for t in model.graph.initializer}
    types = {t.name: t.data_type for t in model.graph.initializer}
    out = {}
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear" and n.input[0] not in consts:
            zp = n.input[2] if len(n.input) > 2 else ""
            out[n.output[0]] = (types.get(zp, onnx.TensorProto.UINT8), n.input[0])
    return out


def _exposing(model: onnx.ModelProto, tensors: dict[str, int]) -> onnx.ModelProto:
    """``model`` that also returns ``tensors`` (name -> elem type)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    m.graph.output.extend(helper.make_tensor_value_info(n, t, None) for n, t in tensors.items() if n not in have)
    return m


def _forced(model: onnx.ModelProto, codes: dict[str, int]) -> onnx.ModelProto:
    """``model`` with each activation quantizer removed and its output made a graph input."""
    sources = {src: onnx.TensorProto.FLOAT for _, src in _activation_quantizers(model).values()}
    m = onnx.ModelProto()
    m.CopyFrom(model)
    keep = [n for n in m.graph.node if not (n.op_type == "QuantizeLinear" and n.output[0] in codes)]
    del m.graph.node[:]
    m.graph.node.extend(keep)
    m.graph.input.extend(helper.make_tensor_value_info(n, t, None) for n, (t, _) in codes.items())
    return _exposing(m, sources)


def _max_rel(a: np.ndarray, b: np.ndarray) -> float:
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a.astype(np.float64) - b)) / max(float(np.max(np.abs(b))), 1e-30))


def check_fold(fused: onnx.ModelProto, unfused: onnx.ModelProto, data: CalibrationSet, batch_size: int) -> FoldCheck:
    codes = _activation_quantizers(unfused)
    if set(_activation_quantizers(fused)) != set(codes):
        raise ValueError("fused and unfused graphs have different activation quantizers")
    outputs = [o.name for o in unfused.graph.output]
    names = outputs + [c for c in codes if c not in outputs]
    code_types = {c: t for c, (t, _) in codes.items()}
    run_u = make_session(_exposing(unfused, code_types), optimized=False)
    run_f = make_session(_exposing(fused, code_types), optimized=False)
    forced_u = make_session(_forced(unfused, codes), optimized=False)
    forced_f = make_session(_forced(fused, codes), optimized=False)
    forced = {o: 0.0 for o in outputs}
    free = {o: 0.0 for o in outputs}
    q_inputs_u = {c: src for c, (_, src) in codes.items()}
    q_inputs_f = {c: src for c, (_, src) in _activation_quantizers(fused).items()}
    at_q = {c: 0.0 for c in codes}
    forced_names_u = outputs + list(dict.fromkeys(q_inputs_u.values()))
    forced_names_f = outputs + list(dict.fromkeys(q_inputs_f.values()))
    total = flipped = worst = 0
    for feed, _ in batches(data, batch_size):
        u = dict(zip(names, run_u.run(names, feed)))
        f = dict(zip(names, run_f.run(names, feed)))
        for c in codes:
            d = np.abs(u[c].astype(np.int32) - f[c].astype(np.int32))
            total, flipped = total + d.size, flipped + int(np.count_nonzero(d))
            worst = max(worst, int(d.max()) if d.size else 0)
        feed_codes = {**feed, **{c: u[c] for c in codes}}
        fu = dict(zip(forced_names_u, forced_u.run(forced_names_u, feed_codes)))
        ff = dict(zip(forced_names_f, forced_f.run(forced_names_f, feed_codes)))
        for o in outputs:
            forced[o] = max(forced[o], _max_rel(ff[o], fu[o]))
            free[o] = max(free[o], _max_rel(f[o], u[o]))
        for c in codes:
            at_q[c] = max(at_q[c], _max_rel(ff[q_inputs_f[c]], fu[q_inputs_u[c]]))
    return FoldCheck(forced, at_q, free, total, flipped, worst)
