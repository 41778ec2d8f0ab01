"""InsertCompensationPass: the *unfused* form of CWAC, explicit Mul/Add ops.

After each compensated layer's compensation point ``y`` (the layer output, or
for a MatMul whose bias lives in the following Add, that Add's output)::

    y ─► Mul(g) ─► Add(β) ─► (former consumers of y)

``g`` and ``β`` are shaped to broadcast on the channel axis: ``[C, 1, ...]``
for Conv/ConvTranspose outputs (axis 1), ``[C]`` for Gemm/MatMul outputs
(last axis).  This graph is what the fit evaluates and what the equivalence
check compares the fused graph against.  A graph output keeps its name.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..cwac.records import Compensation
from ..graph_queries import broadcast_shape, compensation_point
from . import PassResult


class InsertCompensationPass:
    def __init__(self, compensations: dict[str, Compensation]):
        self.compensations = compensations

    def __call__(self, graph: gs.Graph) -> PassResult:
        nodes = {n.name: n for n in graph.nodes}
        count = 0
        for layer, comp in self.compensations.items():
            node = nodes[layer]
            y = compensation_point(node)
            shape = broadcast_shape(node, comp.gain.size)
            consumers = list(y.outputs)
            mid = gs.Variable(f"{y.name}_cwac_scaled", dtype=np.float32)
            out = gs.Variable(f"{y.name}_cwac", dtype=np.float32, shape=y.shape)
            graph.nodes.append(gs.Node("Mul", f"{layer}_cwac_Mul", inputs=[
                y, gs.Constant(f"{layer}_cwac_gain", comp.gain.astype(np.float32).reshape(shape))], outputs=[mid]))
            graph.nodes.append(gs.Node("Add", f"{layer}_cwac_Add", inputs=[
                mid, gs.Constant(f"{layer}_cwac_bias", comp.bias.astype(np.float32).reshape(shape))], outputs=[out]))
            for c in consumers:
                for i, t in enumerate(c.inputs):
                    if t is y:
                        c.inputs[i] = out
            for i, t in enumerate(graph.outputs):
                if t is y:
                    graph.outputs[i] = out
                    out.name, y.name = y.name, f"{y.name}_pre_cwac"
            count += 1
        graph.toposort()
        return PassResult(graph, count > 0, {"compensated_layers": count})
