"""CWAC applied to a QDQ model: the unfused graph (explicit Mul/Add after each layer) and the fused one
(the compensation folded into weight scales, signs and int32 biases), built from the same snapped maps.
"""
from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..graph_io import export_model
from ..graph_queries import output_axis
from ..passes.fold_compensation import FoldCompensationPass, int32_bias_overflow, skip_reason, snap_bias
from ..passes.insert_compensation import InsertCompensationPass
from ..stages import Fold, record
from .records import Compensation

logger = logging.getLogger(__name__)


def build_graphs(qmodel, compensations: dict[str, Compensation], int32_bias: bool = True,
                 float_bias: frozenset[str] = frozenset()):
    """(unfused, fused ModelProtos, the ``Fold`` record) for ``compensations`` on the QDQ model ``qmodel``.
    ``float_bias``: bias-free layers that get a float bias input rather than an int32 bias DQ
    (``FoldCompensationPass``).

    β is first snapped to the folded layer's int32 bias grid, so both graphs
    compute the same function up to float rounding.  A compensation that
    cannot be folded (shared weight, weight not a constant...) is left out of
    *both* graphs, with its reason in the stats: the unfused graph is always
    what the fused one computes.  Likewise a channel whose folded int32 bias
    would overflow int32 is left uncompensated (g = 1, β = 0) in both: counted
    per layer in ``Fold.int32_bias_overflow`` and named in its strategy.
    """
    graph = gs.import_onnx(qmodel)
    nodes = {n.name: n for n in graph.nodes}
    reasons = {k: skip_reason(nodes.get(k)) for k in compensations}
    foldable, overflow = {}, {}
    for k, c in compensations.items():
        if reasons[k] is None:
            bad = int32_bias_overflow(nodes[k], c, int32_bias)
            foldable[k] = _leave_alone(c, bad, "int32_bias_overflow_left_alone") if bad.any() else c
            if bad.any():
                overflow[k] = int(bad.sum())
                logger.debug("%s: %d channel(s) left uncompensated, folded int32 bias would overflow", k, bad.sum())
    snapped = {k: dataclasses.replace(c, bias=snap_bias(nodes[k], c, int32_bias)) for k, c in foldable.items()}
    unfused = export_model(InsertCompensationPass(snapped)(gs.import_onnx(qmodel)).graph)
    result = FoldCompensationPass(snapped, int32_bias, float_bias)(graph)
    stats = result.stats
    stats["int32_bias_overflow"] = overflow
    for k in overflow:
        stats["strategies"][k] += "; channels left uncompensated (folded int32 bias would overflow)"
    for k, why in reasons.items():
        if why is not None:
            stats["strategies"][k] = f"skipped: {why}"
            stats["skipped"][why] = stats["skipped"].get(why, 0) + 1
    return unfused, export_model(result.graph), record(Fold, stats)


def _leave_alone(comp: Compensation, channels: np.ndarray, reason: str) -> Compensation:
    """``comp`` with g = 1, β = 0 on ``channels`` (a bool mask), counted in its stats under ``reason``."""
    return dataclasses.replace(comp, gain=np.where(channels, 1.0, comp.gain).astype(np.float32),
                               bias=np.where(channels, 0.0, comp.bias).astype(np.float32),
                               stats={**comp.stats, reason: int(channels.sum())})


def constrain_full_range(qmodel, compensations: dict[str, Compensation]) -> tuple[dict[str, Compensation], int]:
    """Leave alone (g = 1, β = 0) every channel whose gain is negative but whose integer weight row holds the
    type's minimum (−128 / −8) or has a nonzero zero point: negating that row would overflow.  Only models
    quantized by another tool (upgrade mode) have such rows.  Returns (compensations, channels constrained)."""
    graph = gs.import_onnx(qmodel)
    nodes = {n.name: n for n in graph.nodes}
    out, constrained = {}, 0
    for name, comp in compensations.items():
        dq = nodes[name].inputs[1].inputs[0] if nodes[name].inputs[1].inputs else None
        if dq is None or dq.op != "DequantizeLinear" or not isinstance(dq.inputs[0], gs.Constant):
            out[name] = comp
            continue
        w = np.asarray(dq.inputs[0].values)
        scale = np.asarray(dq.inputs[1].values)
        zp = np.asarray(dq.inputs[2].values).astype(np.int64) if len(dq.inputs) > 2 else np.zeros(1, np.int64)
        axis = int(dq.attrs.get("axis", 1)) % w.ndim if scale.size > 1 else output_axis(nodes[name])
        rows = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
        unflippable = np.any(rows == _int_min(w), axis=1) | np.broadcast_to(zp.reshape(-1) != 0, (rows.shape[0],))
        bad = (comp.gain < 0) & unflippable if unflippable.size == comp.gain.size else np.zeros(comp.gain.size, bool)
        if bad.any():
            constrained += int(bad.sum())
            comp = _leave_alone(comp, bad, "full_range_negative_gain_left_alone")
        out[name] = comp
    return out, constrained


def _int_min(w: np.ndarray) -> int:
    name = w.dtype.name
    if name in ("int4",):
        return -8
    return int(np.iinfo(w.dtype).min) if w.dtype.kind == "i" else -(2**31)




def unfused_model(qmodel: onnx.ModelProto, comps: dict[str, Compensation]) -> onnx.ModelProto:
    """``qmodel`` with ``comps`` as explicit Mul/Add ops (``InsertCompensationPass``)."""
    return export_model(InsertCompensationPass(comps)(gs.import_onnx(qmodel)).graph)
