"""FoldCompensationPass: fold each CWAC map ``y' = g ⊙ y + β`` into the layer.

A quantized layer computes, per output channel c (symmetric per-channel weights
``W[c] = s_w[c]·w_q[c]``, zero point 0, weight DQ on the output axis)::

    y[c] = s_x·s_w[c]·(x_q ∗ w_q[c]) + b[c]

so, with the integer weights unchanged in magnitude::

    g·y + β  =  same layer with   s_w'[c] = |g_c|·s_w[c]
                                  w_q'[c] = sign(g_c)·w_q[c]
                                  b'[c]   = g_c·b[c] + β_c

The weight DQ scale *is* the per-channel factor of onnxruntime's
requantization multiplier ``s_x·s_w[c]/s_y``, so the gain lands in the
requantization scale; nothing is added to the graph.

Cases::

    g_c > 0    scale ×g, row unchanged
    g_c < 0    scale ×|g|, row negated (narrow range [-q, q] ⇒ never overflows)
    g_c = 0    row zeroed, scale kept (positive), the bias carries β

Bias slot: int32 bias DQ (``--target ort``) is requantized with scale exactly
``s_x·s_w'[c]``; a float bias (``--target trt``) is updated in float.  A MatMul
whose bias lives in the following Add gets β folded into that Add's constant.
A Conv / ConvTranspose / Gemm without one gets a bias input: an int32 bias DQ
for the ort target (reported as an inserted op: onnxruntime folds it into its
integer kernel), or a float constant -- for the trt target, and for a layer
onnxruntime runs in float anyway (``float_bias``, another tool's model: there
no integer kernel would absorb the DQ).  That constant holds the int32 grid's
values, so the layer computes exactly what the DQ would have given it
(onnxruntime's optimizer may re-quantize it to int32 + DQ at load time, on the
same grid).  With no bias slot at all an ``Add`` is inserted and *reported* in
the stats.

Exactness: the int32 bias is rounded to its grid, so the caller snaps β to
that grid first (:func:`snap_bias`): the unfused graph then computes exactly
what the fused one does, up to float rounding.

Int32 range: the folded code ``round((g·b + β)/(s_x·|g|·s_w))`` can exceed
int32 where ``s_x·s_w`` is tiny (a near-dead channel) and β or a small |g|
inflates it.  Clipping it would make fused ≠ unfused, so the caller leaves such
channels uncompensated (g = 1, β = 0: the plain layer's bias, which fits) and
reports them (:func:`int32_bias_overflow`, ``cwac.build_graphs``); this pass
refuses (ValueError) rather than clip if handed one anyway.

Preconditions (else skip with a reason): the weight is a constant integer
tensor read only by its DQ, which is read only by this layer; its DQ is
per-channel on the output axis (a per-tensor DQ is converted first).  A
nonzero weight zero point z (another tool's asymmetric weights) is fine for
g ≥ 0, since g·s·(w_q − z) = (g·s)·(w_q − z); a negative gain on such a row,
or on a full-range row holding the type's minimum, cannot be folded without
overflow and is left alone before the fit is used (``constrain_full_range``).
"""
from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs

from ..cwac.records import Compensation
from ..graph_queries import bias_slot, output_axis, producer_of, values
from . import PassResult

logger = logging.getLogger(__name__)


def folded_weight_scale(node: gs.Node, gain: np.ndarray) -> np.ndarray:
    """s_w' = |g|·s_w per channel (s_w where g = 0), float32 as stored."""
    s_w = values(producer_of(node.inputs[1], "DequantizeLinear").inputs[1])
    return np.where(gain == 0, s_w, s_w * np.abs(gain)).astype(np.float32)


def folded_bias_scale(node: gs.Node, w_scale: np.ndarray) -> np.ndarray:
    """The int32 bias scale of the folded layer: exactly float32(s_x·s_w'[c]), as the inserter writes it
    (onnxruntime's QLinearConv/QGemm fusion recomputes it that way and keeps only the int32 values)."""
    s_x = np.float32(values(producer_of(node.inputs[0], "DequantizeLinear").inputs[1]))
    return (s_x * w_scale).astype(np.float32)


def _int32_bias(node: gs.Node, comp: Compensation, int32_bias: bool) -> tuple[np.ndarray, np.ndarray] | None:
    """(current bias b, folded int32 bias scale s_x·s_w'), float64 per channel, when the folded layer's
    bias is int32; None when it is float."""
    slot = bias_slot(node)
    if slot is None:
        if not (int32_bias and node.op != "MatMul" and producer_of(node.inputs[0], "DequantizeLinear") is not None):
            return None
        b = np.zeros(comp.gain.size)  # a new int32 bias will hold β alone
    else:
        bnode, idx = slot
        dq = producer_of(bnode.inputs[idx], "DequantizeLinear")
        if dq is None:
            return None
        b = (values(dq.inputs[0]).astype(np.float64) * values(dq.inputs[1]).astype(np.float64)).reshape(-1)
    return b, folded_bias_scale(node, folded_weight_scale(node, comp.gain)).astype(np.float64)


def snap_bias(node: gs.Node, comp: Compensation, int32_bias: bool = True) -> np.ndarray:
    """β adjusted so that g·b + β lies exactly on the int32 bias grid of the folded layer."""
    grid = _int32_bias(node, comp, int32_bias)
    if grid is None:
        return comp.bias
    b, scale = grid
    g = comp.gain.astype(np.float64)
    target = np.round((g * b + comp.bias) / scale) * scale
    return (target - g * b).astype(np.float32)


def int32_bias_overflow(node: gs.Node, comp: Compensation, int32_bias: bool = True) -> np.ndarray:
    """Per channel: True where the folded int32 bias code would not fit int32 (the layer must pass
    :func:`skip_reason`).  A float bias, or g = 1 and β = 0 on a bias that fits, never overflows."""
    grid = _int32_bias(node, comp, int32_bias)
    if grid is None:
        return np.zeros(comp.gain.size, bool)
    b, scale = grid
    with np.errstate(over="ignore", invalid="ignore"):
        code = np.round((comp.gain.astype(np.float64) * b + comp.bias) / scale)
    return ~(np.abs(code) <= np.iinfo(np.int32).max)


def _to_int32(q: np.ndarray, layer: str) -> np.ndarray:
    lim = np.iinfo(np.int32)
    if not np.all((q >= lim.min) & (q <= lim.max)):
        raise ValueError(f"{layer}: folded int32 bias out of range (leave those channels alone first: "
                         "int32_bias_overflow)")
    return q.astype(np.int32)


def _per_tensor_weight_dq(node: gs.Node) -> gs.Node | None:
    """The layer's weight DQ if it is per-tensor with constant scale / zero point and read only by this layer."""
    dq = producer_of(node.inputs[1], "DequantizeLinear")
    if dq is None or not isinstance(dq.inputs[0], gs.Constant) or not isinstance(dq.inputs[1], gs.Constant):
        return None
    w, scale = dq.inputs[0], dq.inputs[1]
    zp = dq.inputs[2] if len(dq.inputs) > 2 else None
    if values(scale).size != 1 or len(w.outputs) > 1 or len(node.inputs[1].outputs) > 1:
        return None
    if zp is not None and (not isinstance(zp, gs.Constant) or values(zp).size != 1):
        return None
    return dq


def skip_reason(node: gs.Node | None) -> str | None:
    """Why a compensation cannot be folded into ``node`` (None: it can, after per-channel conversion if needed)."""
    reason = FoldCompensationPass._check(node)
    if reason == "weight_not_per_channel_on_output_axis" and _per_tensor_weight_dq(node) is not None:
        return None
    return reason


def _to_per_channel(node: gs.Node) -> bool:
    """A per-tensor weight DQ becomes per-channel on the output axis (same values); True if done."""
    dq = _per_tensor_weight_dq(node)
    if dq is None:
        return False
    w, scale = dq.inputs[0], dq.inputs[1]
    zp = dq.inputs[2] if len(dq.inputs) > 2 else None
    axis = output_axis(node)
    channels = w.shape[axis]
    scale.values = np.full(channels, float(values(scale).reshape(())), np.float32)
    if zp is not None:
        zp.values = np.full(channels, values(zp).reshape(()), values(zp).dtype)
    dq.attrs["axis"] = axis
    return True


class FoldCompensationPass:
    """``int32_bias``: a layer with no bias slot gets an int32 bias DQ (onnxruntime target) rather than a
    float bias (TensorRT target); ``float_bias``: layers that get a float bias (on the int32 grid) even so,
    because onnxruntime runs them in float."""

    def __init__(self, compensations: dict[str, Compensation], int32_bias: bool = True,
                 float_bias: frozenset[str] = frozenset()):
        self.compensations = compensations
        self.int32_bias = int32_bias
        self.float_bias = float_bias

    def __call__(self, graph: gs.Graph) -> PassResult:
        nodes = {n.name: n for n in graph.nodes}
        strategies: dict[str, str] = {}
        skipped: Counter = Counter()
        inserted: list[str] = []
        for layer, comp in self.compensations.items():
            node = nodes.get(layer)
            if node is not None and _to_per_channel(node):
                strategies_note = "per-tensor weight converted to per-channel; "
            else:
                strategies_note = ""
            reason = self._check(node)
            if reason:
                skipped[reason] += 1
                strategies[layer] = f"skipped: {reason}"
                logger.debug("not folding %s: %s", layer, reason)
                continue
            w_scale = folded_weight_scale(node, comp.gain)
            strategies[layer] = strategies_note + self._fold_bias(graph, node, comp, w_scale, inserted, self.int32_bias,
                                                                  layer in self.float_bias)
            self._fold_gain(node, comp.gain, w_scale)
        if inserted:
            graph.cleanup().toposort()
        return PassResult(graph, bool(strategies), {"strategies": strategies, "skipped": dict(skipped),
                                                   "inserted_ops": inserted})

    @staticmethod
    def _check(node: gs.Node | None) -> str | None:
        if node is None:
            return "layer_not_found"
        dq = producer_of(node.inputs[1], "DequantizeLinear")
        if dq is None:
            return "weight_not_dequantized"
        w, scale = dq.inputs[0], dq.inputs[1]
        zp = dq.inputs[2] if len(dq.inputs) > 2 else None
        if not isinstance(w, gs.Constant) or not isinstance(scale, gs.Constant):
            return "weight_not_constant"
        if len(w.outputs) > 1 or len(node.inputs[1].outputs) > 1:
            return "shared_weight"
        axis = int(dq.attrs.get("axis", 1))
        out_axis = output_axis(node)
        if values(scale).size != w.shape[out_axis] or axis % len(w.shape) != out_axis:
            return "weight_not_per_channel_on_output_axis"
        if zp is not None and not isinstance(zp, gs.Constant):
            return "weight_zero_point_not_constant"
        return None

    @staticmethod
    def _fold_gain(node: gs.Node, gain: np.ndarray, w_scale: np.ndarray) -> None:
        dq = producer_of(node.inputs[1], "DequantizeLinear")
        w, scale = dq.inputs[0], dq.inputs[1]
        axis = int(dq.attrs.get("axis", 1)) % len(w.shape)
        shape = [1] * len(w.shape)
        shape[axis] = -1
        sign = np.where(gain < 0, -1, 1).reshape(shape)
        zero = (gain == 0).reshape(shape)
        zp = values(dq.inputs[2]).astype(np.int32).reshape(shape) if len(dq.inputs) > 2 else np.zeros(shape, np.int32)
        if np.any((gain.reshape(shape) < 0) & (zp != 0)):
            raise ValueError("negative gain on a weight row with a nonzero zero point (constrain_full_range first)")
        w_q = values(w)
        # g < 0: negate the row (zero point 0); g = 0: the row becomes its zero point (dequantizes to 0)
        w.values = np.where(zero, zp, w_q.astype(np.int32) * sign).astype(w_q.dtype)
        scale.values = w_scale

    @staticmethod
    def _fold_bias(graph: gs.Graph, node: gs.Node, comp: Compensation, w_scale: np.ndarray,
                   inserted: list[str], int32_bias: bool, float_bias: bool = False) -> str:
        slot = bias_slot(node)
        g, beta = comp.gain.astype(np.float64), comp.bias.astype(np.float64)
        if slot is None:
            if node.op in ("Conv", "ConvTranspose", "Gemm"):
                if int32_bias and producer_of(node.inputs[0], "DequantizeLinear") is not None:
                    scale = folded_bias_scale(node, w_scale)
                    b_int = _to_int32(np.round(beta / scale.astype(np.float64)), node.name)
                    if float_bias:  # what the DQ would compute: float32(q)·scale, one float32 product
                        node.inputs.append(gs.Constant(f"{node.name}_cwac_bias", b_int.astype(np.float32) * scale))
                        return "gain->weight scale, beta->new float bias input (runs in float; int32 grid values)"
                    out = gs.Variable(f"{node.name}_cwac_bias_dequantized", dtype=np.float32, shape=[b_int.size])
                    graph.nodes.append(gs.Node("DequantizeLinear", f"{node.name}_cwac_bias_DequantizeLinear",
                                               attrs={"axis": 0}, outputs=[out], inputs=[
                                                   gs.Constant(f"{node.name}_cwac_bias_quantized", b_int),
                                                   gs.Constant(f"{node.name}_cwac_bias_scale", scale),
                                                   gs.Constant(f"{node.name}_cwac_bias_zero_point",
                                                               np.zeros(b_int.size, np.int32))]))
                    node.inputs.append(out)
                    inserted.append(f"{node.name}_cwac_bias_DequantizeLinear")
                    return "gain->weight scale, beta->new int32 bias input (extra DequantizeLinear)"
                node.inputs.append(gs.Constant(f"{node.name}_cwac_bias", beta.astype(np.float32)))
                return "gain->weight scale, beta->new float bias input"
            return FoldCompensationPass._insert_add(graph, node, comp, inserted)
        bnode, idx = slot
        dq = producer_of(bnode.inputs[idx], "DequantizeLinear")
        if dq is None:  # float bias (trt target, or a MatMul's float Add)
            b = bnode.inputs[idx]
            bvals = values(b).astype(np.float64)
            scale_b = g if bnode is node else g.reshape(bvals.shape) if bvals.size == g.size else None
            if scale_b is None:
                return FoldCompensationPass._insert_add(graph, node, comp, inserted)
            b.values = (scale_b * bvals + beta.reshape(bvals.shape)).astype(np.float32)
            return "gain->weight scale, beta->float bias"
        b_int, b_scale = dq.inputs[0], dq.inputs[1]
        b_zp = values(dq.inputs[2]).astype(np.float64) if len(dq.inputs) > 2 else 0.0
        b = (values(b_int).astype(np.float64) - b_zp) * values(b_scale).astype(np.float64)
        new_scale = folded_bias_scale(node, w_scale)
        q = np.round((g * b.reshape(-1) + beta) / new_scale.astype(np.float64))
        b_int.values = _to_int32(q, node.name).reshape(values(b_int).shape)
        # the bias DQ is now per channel, whatever it was (another tool's per-tensor bias: a scalar scale)
        b_scale.values = new_scale
        dq.attrs["axis"] = 0
        if len(dq.inputs) > 2:
            dq.inputs[2] = gs.Constant(f"{node.name}_cwac_bias_zero_point", np.zeros(new_scale.size, np.int32))
        return "gain->weight scale, beta->int32 bias"

    @staticmethod
    def _insert_add(graph: gs.Graph, node: gs.Node, comp: Compensation, inserted: list[str]) -> str:
        out = node.outputs[0]
        new = gs.Variable(f"{out.name}_cwac", dtype=out.dtype, shape=out.shape)
        consumers = list(out.outputs)
        beta = gs.Constant(f"{node.name}_cwac_beta", comp.bias.astype(np.float32))
        add = gs.Node("Add", f"{node.name}_cwac_Add", inputs=[out, beta], outputs=[new])
        graph.nodes.append(add)
        for c in consumers:
            for i, t in enumerate(c.inputs):
                if t is out:
                    c.inputs[i] = new
        if any(t is out for t in graph.outputs):  # keep the graph output's name on the compensated tensor
            graph.outputs[[i for i, t in enumerate(graph.outputs) if t is out][0]] = new
            new.name, out.name = out.name, f"{out.name}_pre_cwac"
        inserted.append(add.name)
        return "gain->weight scale, beta->inserted Add (extra op)"
