"""Questions the passes and the CWAC fit ask of a quantized layer in a graphsurgeon graph: where its weight,
bias and compensation point are, and along which axes its channels lie.  One answer each, shared by the
Q/DQ inserter, the compensation inserter, the fold pass and the fit.

Axes, for a layer with C output channels::

    weight          Conv [C, Cin/g, k...]  ConvTranspose [Cin, C, k...]  MatMul [K, C]  Gemm [C, K] (transB) or [K, C]
    output_axis     0                      1                             1              0 (transB) or 1
    activation      1 (NCHW)               1                             -1 (last)      -1
    (channel_axis)

A leaf module: it imports nothing from the package.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs


def producer_of(t: gs.Tensor, op: str) -> gs.Node | None:
    """The node of type ``op`` that alone produces ``t``, or None."""
    if isinstance(t, gs.Variable) and len(t.inputs) == 1 and t.inputs[0].op == op:
        return t.inputs[0]
    return None


def values(t: gs.Tensor) -> np.ndarray:
    """A constant's values as an array."""
    return np.asarray(t.values)


def output_axis(node: gs.Node) -> int:
    """The output-channel axis of a layer's weight (Conv 0, ConvTranspose / MatMul 1, Gemm by transB)."""
    if node.op in ("Conv",):
        return 0
    if node.op == "Gemm":
        return 0 if int(node.attrs.get("transB", 0)) else 1
    return 1  # ConvTranspose (group 1), MatMul


def channel_axis(op: str) -> int:
    """The channel axis of a layer's *output* activation: 1 for Conv/ConvTranspose (NCHW), last otherwise."""
    return 1 if op in ("Conv", "ConvTranspose") else -1


def weight_shape(node: gs.Node) -> tuple[int, ...]:
    """Shape of a layer's weight: its input 1, or the constant behind the DequantizeLinear producing it."""
    w = node.inputs[1]
    if w.shape is None and (dq := producer_of(w, "DequantizeLinear")) is not None:
        w = dq.inputs[0]
    return tuple(w.shape)


def bias_slot(node: gs.Node) -> tuple[gs.Node, int] | None:
    """(node, input index) holding the layer's bias: its own input 2, or MatMul's following Add."""
    if node.op in ("Conv", "ConvTranspose", "Gemm"):
        return (node, 2) if len(node.inputs) > 2 and node.inputs[2].name else None
    out = node.outputs[0]
    if len(out.outputs) == 1 and out.outputs[0].op == "Add":
        add = out.outputs[0]
        other = 1 if add.inputs[0] is out else 0
        b = add.inputs[other]
        if isinstance(b, gs.Constant) or producer_of(b, "DequantizeLinear"):
            return add, other
    return None


def compensation_point(node: gs.Node) -> gs.Variable:
    """The tensor CWAC corrects: the layer output, including a MatMul's following bias Add."""
    slot = bias_slot(node)
    if node.op == "MatMul" and slot is not None:
        return slot[0].outputs[0]
    return node.outputs[0]


def broadcast_shape(node: gs.Node, channels: int) -> tuple[int, ...]:
    """The shape a per-channel vector takes to broadcast over the layer's output: ``[C, 1, ...]`` for
    Conv/ConvTranspose (axis 1), ``[C]`` for Gemm/MatMul (last axis)."""
    if node.op in ("Conv", "ConvTranspose"):
        return (channels,) + (1,) * (len(weight_shape(node)) - 2)
    return (channels,)


def integer_weights(model: onnx.ModelProto, layers: list[tuple[str, str]]) -> dict[str, str]:
    """layer -> the name of its integer weight (the input of its weight DequantizeLinear), for ``layers``
    given as (node name, float weight name); a layer whose weight is not dequantized keeps the float name."""
    producer = {o: n for n in model.graph.node for o in n.output}
    nodes = {n.name: n for n in model.graph.node}
    out = {}
    for node, weight in layers:
        dq = producer.get(nodes[node].input[1]) if node in nodes else None
        out[node] = dq.input[0] if dq is not None and dq.op_type == "DequantizeLinear" else weight
    return out
