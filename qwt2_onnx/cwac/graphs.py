"""What one candidate target's staged fit runs (``FitGraphs``): built the same way on the driver and on every
shard worker, from the float model, the plain QDQ model and the plan."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..graph_io import export_model
from ..graph_queries import channel_axis, weight_shape
from ..passes.insert_compensation import InsertCompensationPass
from ..policy import QuantPlan
from .points import float_point, layer_stages
from .records import Compensation
from .segments import SegmentPlan


def _identity(plan: QuantPlan, graph: gs.Graph) -> dict[str, Compensation]:
    """g = 1, β = 0 for every layer: the unfused graph's structure, before any fit."""
    nodes = {n.name: n for n in graph.nodes}
    comps = {}
    for lp in plan.layers:
        c = weight_shape(nodes[lp.node])[lp.axis]
        comps[lp.node] = Compensation(lp.node, np.ones(c, np.float32), np.zeros(c, np.float32), channel_axis(lp.op), "none", {})
    return comps


def _add_local_twins(graph: gs.Graph, plan: QuantPlan, float_consts: dict[str, np.ndarray]) -> dict[str, str]:
    """For each layer a float copy reading the same (dequantized) input; -> layer: twin output name."""
    nodes = {n.name: n for n in graph.nodes}
    twins = {}
    for lp in plan.layers:
        node = nodes[lp.node]
        inputs = [node.inputs[0], gs.Constant(f"{lp.weight}_cwac_local_w", float_consts[lp.weight])]
        if lp.bias and lp.bias_node == lp.node:
            inputs.append(gs.Constant(f"{lp.bias}_cwac_local_b", float_consts[lp.bias]))
        y = gs.Variable(f"{lp.node}_cwac_local_y", dtype=np.float32)
        graph.nodes.append(gs.Node(node.op, f"{lp.node}_cwac_local", dict(node.attrs), inputs, [y]))
        if lp.bias and lp.bias_node != lp.node:  # MatMul -> Add(b)
            b = gs.Constant(f"{lp.bias}_cwac_local_b", float_consts[lp.bias])
            out = gs.Variable(f"{lp.node}_cwac_local_yb", dtype=np.float32)
            graph.nodes.append(gs.Node("Add", f"{lp.node}_cwac_local_add",
                                       inputs=[y, b] if lp.bias_input == 1 else [b, y], outputs=[out]))
            y = out
        twins[lp.node] = y.name
    return twins


class FitGraphs:
    """What one candidate target's staged fit runs, built the same way wherever it runs (the driver and every
    shard worker): the unfused model with identity compensations (and, for ``local``, each layer's float
    twin), the float model, and their segment plans, one segment per stage."""

    def __init__(self, float_model: onnx.ModelProto, qmodel: onnx.ModelProto, plan: QuantPlan, target: str):
        self.target = target
        qgraph = gs.import_onnx(qmodel)
        nodes = {n.name: n for n in qgraph.nodes}
        self.layers = [lp.node for lp in plan.layers]
        self.stages = layer_stages(qmodel, self.layers)
        fgraph = gs.import_onnx(float_model)
        fnodes = {n.name: n for n in fgraph.nodes}
        self.fpoints = {name: float_point(nodes[name], fnodes) for name in self.layers}
        self.axes = {lp.node: channel_axis(lp.op) for lp in plan.layers}
        InsertCompensationPass(_identity(plan, qgraph))(qgraph)
        self.twins = {}
        if target == "local":
            consts = {t.name: onnx.numpy_helper.to_array(t) for t in float_model.graph.initializer}
            self.twins = _add_local_twins(qgraph, plan, consts)
        qgraph.toposort()
        self.umodel = export_model(qgraph)
        # the raw (pre-compensation) point: the compensation Mul's input, renamed if it was a graph output
        muls = {n.name: n for n in self.umodel.graph.node}
        self.raw = {name: muls[f"{name}_cwac_Mul"].input[0] for name in self.layers}
        self.inits = {t.name: t for t in self.umodel.graph.initializer}
        self.fmodel = export_model(fgraph.toposort())
        n_stages = max(self.stages.values(), default=0)
        self.members = [[n for n in self.layers if self.stages[n] == s] for s in range(1, n_stages + 1)]
        self.q_plan = SegmentPlan(self.umodel, [[self.raw[n] for n in m] + [self.twins[n] for n in m if n in self.twins]
                                                for m in self.members])
        self.f_plan = SegmentPlan(self.fmodel, [[self.fpoints[n] for n in m] for m in self.members]) \
            if target == "global" else None

    def set_initializers(self, comp: Compensation) -> None:
        for suffix, value in (("gain", comp.gain), ("bias", comp.bias)):
            t = self.inits[f"{comp.layer}_cwac_{suffix}"]
            shape = tuple(t.dims)
            t.CopyFrom(onnx.numpy_helper.from_array(value.astype(np.float32).reshape(shape), t.name))
