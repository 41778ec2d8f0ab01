"""What gets Q/DQ: the per-op policy table and the quantization plan.

The table says, per op type, which input is the activation, which the weight
(and its output-channel axis), which the bias, and whether the layer's output
gets a Q/DQ pair.  onnxruntime needs that output pair to turn
``DQ -> Conv -> Q`` into ``QLinearConv``; MatMul and Gemm run as integer
kernels with a float output (MatMulIntegerToFloat, QGemm) without it.

Default policy ("quantize the linear layers, keep everything else float"):

* only Conv, ConvTranspose, Gemm and MatMul with a constant weight are
  quantized; Add, Concat, Sigmoid, Softmax, pooling, resizing... stay float,
  so tensors that mix quantities of very different scale (YOLO's final Concat
  of box coordinates and class scores) are never squeezed into one scale;
* a layer's output Q/DQ is placed after a single following Relu (onnxruntime
  fuses Relu into the quantizer), never on a graph output;
* a tensor gets one Q/DQ pair however many quantized layers read it.

``plan_quantization`` returns a :class:`QuantPlan` of :class:`LayerPlan`
records; layers it cannot quantize are listed with a reason.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import logging
import re

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .config import QuantConfig
from .graph_queries import integer_weights, output_axis, producer_of
from .quant import integer_range

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class OpPolicy:
    activation: int
    weight: int
    bias: int | None
    quantize_output: bool


POLICY: dict[str, OpPolicy] = {
    "Conv": OpPolicy(activation=0, weight=1, bias=2, quantize_output=True),
    "ConvTranspose": OpPolicy(activation=0, weight=1, bias=2, quantize_output=True),
    "Gemm": OpPolicy(activation=0, weight=1, bias=2, quantize_output=False),
    "MatMul": OpPolicy(activation=0, weight=1, bias=None, quantize_output=False),
}


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """One layer to quantize.  ``axis`` is the weight's output-channel axis."""

    node: str
    op: str
    activation: str
    weight: str
    axis: int
    bias: str | None
    output: str | None  # tensor that gets the output Q/DQ (after a fused Relu), if any
    bias_node: str | None = None  # node whose input ``bias_input`` is the bias (the layer, or MatMul's Add)
    bias_input: int = 2


@dataclasses.dataclass
class QuantPlan:
    layers: list[LayerPlan]
    skipped: dict[str, str]  # node name -> reason
    unmatched_patterns: list[str]
    left_float: dict[str, str] = dataclasses.field(default_factory=dict)  # other compute ops no Q/DQ goes around

    @property
    def activation_tensors(self) -> list[str]:
        names = {lp.activation for lp in self.layers} | {lp.output for lp in self.layers if lp.output}
        return sorted(names)

    @property
    def output_points(self) -> set[str]:
        return {lp.output for lp in self.layers if lp.output}

    def integer_weights(self, model: onnx.ModelProto) -> dict[str, str]:
        """layer -> the name of its integer weight in ``model`` (``graph_queries.integer_weights``)."""
        return integer_weights(model, [(lp.node, lp.weight) for lp in self.layers])


def _pattern_matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def _weight_axis(node: gs.Node, weight: gs.Constant) -> int | str:
    """Output-channel axis of the weight, or a skip reason."""
    ndim = len(weight.shape)
    if node.op == "Conv":
        return 0
    if node.op == "ConvTranspose":
        return 1 if int(node.attrs.get("group", 1)) == 1 else "grouped_conv_transpose"
    if node.op == "Gemm":
        if int(node.attrs.get("transA", 0)):
            return "gemm_transA"
        return 0 if int(node.attrs.get("transB", 0)) else 1
    return 1 if ndim == 2 else "matmul_weight_not_2d"


def _layer_reason(node: gs.Node, graph_inputs: set[int]) -> str | None:
    pol = POLICY[node.op]
    if len(node.inputs) <= pol.weight:
        return "missing_weight"
    w, x = node.inputs[pol.weight], node.inputs[pol.activation]
    if id(w) in graph_inputs:
        return "weight_is_graph_input"
    if not isinstance(w, gs.Constant):
        return "no_constant_weight" if not isinstance(x, gs.Constant) else "weight_on_left"
    if isinstance(x, gs.Constant):
        return "constant_activation"
    if w.values.dtype.kind != "f":
        return "weight_not_float"
    if w.values.size == 0:
        return "zero_size_weight"
    if len(w.outputs) > 1:
        return "shared_weight"
    if pol.bias is not None and len(node.inputs) > pol.bias and node.inputs[pol.bias].name:
        b = node.inputs[pol.bias]
        if not isinstance(b, gs.Constant):
            return "non_constant_bias"
        if len(b.outputs) > 1:
            return "shared_bias"
        if node.op == "Gemm" and (b.shape is None or len(b.shape) != 1):
            return "gemm_bias_not_1d"
        if node.op == "Gemm" and (float(node.attrs.get("alpha", 1.0)) != 1.0 or float(node.attrs.get("beta", 1.0)) != 1.0):
            return "gemm_alpha_beta"
    return None


def _matmul_add_bias(node: gs.Node, graph_outputs: set[int]) -> tuple[str, int] | None:
    """The constant bias of ``MatMul -> Add(b)`` when the activation is 2-D.

    onnxruntime rewrites such a pair into Gemm before its QDQ fusion; with an
    int32 bias DQ the Gemm becomes QGemm, with a float bias it stays float.
    """
    out, x = node.outputs[0], node.inputs[0]
    if len(out.outputs) != 1 or id(out) in graph_outputs or out.outputs[0].op != "Add":
        return None
    if x.shape is None or len(x.shape) != 2:
        return None
    add = out.outputs[0]
    idx = 1 if add.inputs[0] is out else 0
    b, n_out = add.inputs[idx], node.inputs[1].shape[-1]
    if isinstance(b, gs.Constant) and b.shape is not None and tuple(b.shape) == (n_out,) and len(b.outputs) == 1:
        return add.name, idx
    return None


def _clips_at_zero(node: gs.Node) -> bool:
    """Relu, or a Clip whose lower bound is a constant 0 (ReLU6 and its kin): an activation whose output
    range starts at 0, which onnxruntime folds into the QuantizeLinear that follows it."""
    if node.op == "Relu":
        return True
    if node.op != "Clip":
        return False
    lo = node.inputs[1] if len(node.inputs) > 1 and node.inputs[1].name else None
    if lo is None:
        return float(node.attrs.get("min", -np.inf)) == 0.0  # opset < 11 keeps the bounds as attributes
    return isinstance(lo, gs.Constant) and lo.values.size == 1 and float(np.asarray(lo.values).reshape(-1)[0]) == 0.0


def _output_point(node: gs.Node, graph_outputs: set[int]) -> str | None:
    """Where a Conv's output is quantized: after a following Relu or ReLU6-like Clip (their range starts at
    0, so the 8 bits are not spent on negative values the activation throws away), else its own output."""
    out = node.outputs[0]
    if id(out) in graph_outputs:
        return None
    if len(out.outputs) == 1 and _clips_at_zero(out.outputs[0]) and id(out.outputs[0].outputs[0]) not in graph_outputs:
        return out.outputs[0].outputs[0].name
    return out.name


def plan_quantization(graph: gs.Graph, cfg: QuantConfig) -> QuantPlan:
    graph_inputs = {id(t) for t in graph.inputs}
    graph_outputs = {id(t) for t in graph.outputs}
    patterns = list(cfg.exclude_names)
    used: set[str] = set()
    layers, skipped = [], {}
    nodes_by_name = {n.name: n for n in graph.nodes}
    for node in graph.nodes:
        if node.op not in POLICY:
            continue
        hit = [p for p in patterns if _pattern_matches(p, node.name)]
        used.update(hit)
        if hit or node.op in cfg.exclude_op_types:
            skipped[node.name] = f"excluded by {hit[0]!r}" if hit else f"excluded op type {node.op}"
            continue
        reason = _layer_reason(node, graph_inputs)
        pol = POLICY[node.op]
        axis = _weight_axis(node, node.inputs[pol.weight]) if reason is None else None
        if isinstance(axis, str):
            reason = axis
        if reason:
            skipped[node.name] = reason
            logger.debug("not quantizing %s (%s): %s", node.name, node.op, reason)
            continue
        has_bias = pol.bias is not None and len(node.inputs) > pol.bias and node.inputs[pol.bias].name
        bias_node, bias_input = (node.name, pol.bias) if has_bias else (None, 2)
        if node.op == "MatMul" and (found := _matmul_add_bias(node, graph_outputs)):
            bias_node, bias_input = found
        layers.append(LayerPlan(
            node=node.name, op=node.op, activation=node.inputs[pol.activation].name,
            weight=node.inputs[pol.weight].name, axis=axis,
            bias=nodes_by_name[bias_node].inputs[bias_input].name if bias_node else None,
            output=_output_point(node, graph_outputs) if pol.quantize_output else None,
            bias_node=bias_node, bias_input=bias_input))
    unmatched = [p for p in patterns if p not in used]
    return QuantPlan(layers, skipped, unmatched, left_float_ops(graph))


FLOAT_KINDS = {"If": "control flow", "Loop": "control flow", "Scan": "control flow",
               "LSTM": "recurrent", "GRU": "recurrent", "RNN": "recurrent"}


def left_float_ops(graph: gs.Graph) -> dict[str, str]:
    """Nodes the policy never quantizes but a user would ask about: control flow, recurrent layers and
    custom-domain ops.  They run in float between the quantized layers around them."""
    out = {}
    for node in graph.nodes:
        if node.op in FLOAT_KINDS:
            out[node.name] = f"{node.op}: {FLOAT_KINDS[node.op]}"
        elif node.domain not in (None, "", "ai.onnx"):  # onnx-graphsurgeon leaves the default domain None
            out[node.name] = f"{node.domain}::{node.op}: custom-domain op"
    return out


def _dq_of_constant(t: gs.Tensor) -> gs.Node | None:
    """The DequantizeLinear producing ``t`` from a constant integer tensor, if any."""
    dq = producer_of(t, "DequantizeLinear")
    return dq if dq is not None and isinstance(dq.inputs[0], gs.Constant) else None



def plan_from_qdq(qgraph: gs.Graph, fgraph: gs.Graph) -> QuantPlan:
    """The layers of an already-quantized QDQ graph (upgrade mode): every Conv/ConvTranspose/Gemm/MatMul
    whose weight is a DequantizeLinear of a constant and whose activation is dequantized.  Weight and
    bias names are the float graph's (matched by node name), for the local CWAC target."""
    fnodes = {n.name: n for n in fgraph.nodes}
    layers, skipped = [], {}
    for node in qgraph.nodes:
        if node.op not in POLICY:
            continue
        reason = None
        if len(node.inputs) < 2 or _dq_of_constant(node.inputs[1]) is None:
            reason = "weight_not_quantized"
        elif not (isinstance(node.inputs[0], gs.Variable) and node.inputs[0].inputs
                  and node.inputs[0].inputs[0].op == "DequantizeLinear"):
            reason = "activation_not_quantized"
        elif node.op == "ConvTranspose" and int(node.attrs.get("group", 1)) != 1:
            reason = "grouped_conv_transpose"
        elif node.name not in fnodes or fnodes[node.name].op != node.op:
            reason = "no_float_counterpart"
        if reason:
            skipped[node.name] = reason
            continue
        fnode = fnodes[node.name]
        bias_node, bias_input, bias = None, 2, None
        if len(node.inputs) > 2 and node.inputs[2].name:
            bias_node, bias = node.name, fnode.inputs[2].name if len(fnode.inputs) > 2 else None
        elif node.op == "MatMul" and len(out := node.outputs[0].outputs) == 1 and out[0].op == "Add":
            add = out[0]
            bias_input = 1 if add.inputs[0] is node.outputs[0] else 0
            fadd = fnodes.get(add.name)
            if fadd is not None and fadd.op == "Add" and isinstance(fadd.inputs[bias_input], gs.Constant):
                bias_node, bias = add.name, fadd.inputs[bias_input].name
        layers.append(LayerPlan(node=node.name, op=node.op, activation=node.inputs[0].name,
                                weight=fnode.inputs[1].name, axis=output_axis(node), bias=bias, output=None,
                                bias_node=bias_node, bias_input=bias_input))
    return QuantPlan(layers, skipped, [])


COARSE_GRID_FRACTION = 1 / 8  # a median channel below 1/8 of the grid's steps has lost 3 bits or more


def coarse_weight_grids(qgraph: gs.Graph, plan: QuantPlan) -> dict[str, dict]:
    """Upgrade mode's account of the input model's weight grids: the layers whose weight is quantized per
    tensor with a scale so wide that their median output channel spans under ``COARSE_GRID_FRACTION`` of
    the grid's steps (a few outlier channels set the scale; the others keep a handful of levels).  CWAC
    keeps the input's grid and cannot give those channels their bits back; per-channel weights can.
    {layer: {median_channel_steps, widest_channel_steps, grid_steps, channels, channels_below}}."""
    nodes = {n.name: n for n in qgraph.nodes}
    found = {}
    for layer in plan.layers:
        dq = _dq_of_constant(nodes[layer.node].inputs[1])
        if dq is None or np.asarray(dq.inputs[1].values).size != 1:
            continue  # per-channel scales fit each channel
        codes = np.asarray(dq.inputs[0].values)
        zp = int(np.asarray(dq.inputs[2].values).astype(np.int64).ravel()[0]) \
            if len(dq.inputs) > 2 and isinstance(dq.inputs[2], gs.Constant) else 0
        lo, hi = integer_range(codes.dtype)
        grid = max(hi - zp, zp - lo)
        rows = np.moveaxis(np.abs(codes.astype(np.int64) - zp), layer.axis, 0).reshape(codes.shape[layer.axis], -1)
        span = rows.max(axis=1)
        median = float(np.median(span))
        if median < grid * COARSE_GRID_FRACTION:
            found[layer.node] = {"median_channel_steps": median, "widest_channel_steps": int(span.max()),
                                 "grid_steps": int(grid), "channels": int(span.size),
                                 "channels_below": int(np.sum(span < grid * COARSE_GRID_FRACTION))}
    return found


def quantized_op_types(model_ops: set[str]) -> set[str]:
    """The quantization ops present in a model (QDQ or QOperator form)."""
    return {op for op in model_ops if op in ("QuantizeLinear", "DequantizeLinear") or op.startswith("QLinear")
            or op in ("ConvInteger", "MatMulInteger", "MatMulIntegerToFloat", "QGemm", "DynamicQuantizeLinear")}
