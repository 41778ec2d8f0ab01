"""Where the staged fit reads: each layer's stage, its compensation point in the float model, and which layers
are score heads (fitted to keep their logits' spread).
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..graph_queries import compensation_point
from ..runtime import make_session, with_outputs
from .gate import SHAPE_ONLY, sigmoid_logits
from .segments import node_inputs


def layer_stages(model: onnx.ModelProto, layers: list[str]) -> dict[str, int]:
    """Stage of each layer: 1 + max stage of quantized layers upstream, through subgraphs' outer-scope
    reads too (a layer behind an If whose branch reads another layer's output comes after it).  The
    model's nodes must be in topological order, as the passes leave them."""
    wanted = set(layers)
    depth: dict[str, int] = {}  # tensor name -> max stage upstream
    stages = {}
    for node in model.graph.node:
        d = max((depth.get(t, 0) for t in node_inputs(node)), default=0)
        if node.name in wanted:
            d += 1
            stages[node.name] = d
        for t in node.output:
            depth[t] = d
    return stages


def float_point(qnode: gs.Node, fnodes: dict[str, gs.Node]) -> str:
    """The float model's tensor at the quantized layer's compensation point, found through node names
    (tensor names may differ in a model quantized by another tool): the output of the float node that
    produces the point — the layer itself or its bias Add — or, when that node was inserted by us (the
    zero-bias Add of a MatMul whose following Add is not its bias, e.g. a 3-D MatMul), the layer's output.
    Matching the layer's own compensation point in the float graph instead would take such a following
    Add for the bias and fit against a target shifted by it.  ``fnodes``: the float graph's nodes by name."""
    point = compensation_point(qnode)
    producer = point.inputs[0].name if point.inputs else qnode.name
    if producer in fnodes:
        return fnodes[producer].outputs[0].name
    return fnodes[qnode.name].outputs[0].name if qnode.name in fnodes else point.name


_DATA_MOVEMENT = SHAPE_ONLY + ("Concat", "Split", "Slice")


def score_head_layers(float_model: onnx.ModelProto, fpoints: dict[str, str], feed: dict[str, np.ndarray]) -> set[str]:
    """The layers whose output is a score head's logits, fitted with ``keep_spread`` (see
    :mod:`qwt2_onnx.cwac`): their float point reaches the input of a Sigmoid at a graph output through
    data movement only (reshapes, Concat, Split, Slice).  A Split or Slice may send another layer's
    values elsewhere (YOLO's heads concatenate box and class channels, then split them again), so where the
    walk passed one, each candidate is confirmed on ``feed``: every value of its tensor must reappear,
    copied, in the logits.  ``fpoints``: layer -> its float compensation point."""
    producer = {o: n for n in float_model.graph.node for o in n.output}
    layers_at: dict[str, list[str]] = {}
    for layer, t in fpoints.items():
        layers_at.setdefault(t, []).append(layer)
    heads: set[str] = set()
    for logits in sigmoid_logits(float_model):
        found, stack, seen, selective = set(), [logits], set(), False
        while stack:
            t = stack.pop()
            if t in seen:
                continue
            seen.add(t)
            node = producer.get(t)
            if t in layers_at:
                found.add(t)
            elif node is not None and node.op_type in _DATA_MOVEMENT:
                selective |= node.op_type in ("Split", "Slice")
                stack += list(node.input) if node.op_type == "Concat" else [node.input[0]]
        if found and selective:
            names = [logits, *sorted(found)]
            values = dict(zip(names, make_session(with_outputs(float_model, names), optimized=False).run(names, feed)))
            found = {t for t in found if np.isin(values[t], values[logits]).all()}
        heads |= {layer for t in found for layer in layers_at[t]}
    return heads
