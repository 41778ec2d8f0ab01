"""SegmentPlan: each stage's segment stops at what earlier segments computed, unless that could be stale."""
from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from qwt2_onnx.cwac.segments import SegmentPlan


def _residual_chain(depth: int):
    """x -> MatMul_k -> Mul(gain) -> Add(residual) -> ... : the residual stream bypasses every stage point."""
    nodes, inits, prev = [], [], "x"
    for k in range(depth):
        inits += [helper.make_tensor(f"w{k}", TensorProto.FLOAT, [4, 4], np.eye(4).ravel().tolist()),
                  helper.make_tensor(f"g{k}", TensorProto.FLOAT, [4], [1.0] * 4)]
        nodes += [helper.make_node("MatMul", [prev, f"w{k}"], [f"p{k}"], name=f"mm{k}"),
                  helper.make_node("Mul", [f"p{k}", f"g{k}"], [f"c{k}"], name=f"comp{k}"),
                  helper.make_node("Add", [f"c{k}", prev], [f"r{k}"], name=f"res{k}")]
        prev = f"r{k}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [1, 4])], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_residual_stream_is_cached_not_recomputed_from_the_inputs():
    """Segment k reads the residual r_{k-2} that segment k-1 computed: every segment after the second has
    the same few nodes (a plan that stopped only at stage points would grow with the depth)."""
    depth = 8
    model = _residual_chain(depth)
    plan = SegmentPlan(model, [[f"p{k}"] for k in range(depth)])
    sizes = [len(s.nodes) for s in plan.segments]
    assert sizes[1:] == [3] * (depth - 1), sizes  # the previous stage's Mul and residual Add, this MatMul
    names = {i: n.name for i, n in enumerate(model.graph.node)}
    last = plan.segments[-1]
    assert {names[i] for i in last.nodes} == {f"comp{depth - 2}", f"res{depth - 2}", f"mm{depth - 1}"}
    assert f"r{depth - 3}" in last.inputs  # computed by the segment before, cached
    assert f"r{depth - 3}" in plan.segments[-2].outputs[1:]  # ... which returns it after its own point


def test_what_reads_a_later_stage_point_is_recomputed():
    """A subgraph's outer-scope read lets stage 1's segment reach stage 2's point p1 (whose compensation is
    not fitted yet): what it computed from p1 is not reused by later segments; what it computed before p1
    is."""
    then = helper.make_graph([helper.make_node("Identity", ["c1"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    inits = [helper.make_tensor("w", TensorProto.FLOAT, [4, 4], np.eye(4).ravel().tolist()),
             helper.make_tensor("g", TensorProto.FLOAT, [4], [1.0] * 4),
             helper.make_tensor("cond", TensorProto.BOOL, [], [True])]
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="relu"),
             helper.make_node("MatMul", ["a", "w"], ["p1"], name="mm1"),  # stage 2's point
             helper.make_node("Mul", ["p1", "g"], ["c1"], name="comp1"),  # stage 2's compensation
             helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then, else_branch=then),
             helper.make_node("MatMul", ["y", "w"], ["p0"], name="mm0"),  # stage 1's point, behind the If
             helper.make_node("MatMul", ["c1", "w"], ["p2"], name="mm2")]  # stage 3's point
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("p0", TensorProto.FLOAT, [1, 4]),
                               helper.make_tensor_value_info("p2", TensorProto.FLOAT, [1, 4])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    plan = SegmentPlan(model, [["p0"], ["p1"], ["p2"]])
    names = {i: n.name for i, n in enumerate(model.graph.node)}
    assert {names[i] for i in plan.segments[0].nodes} == {"relu", "mm1", "comp1", "if", "mm0"}
    assert plan.segments[1].inputs == ("p1",) and "p1" in plan.segments[0].outputs  # computed before: reused
    assert {names[i] for i in plan.segments[2].nodes} == {"comp1", "mm2"}  # c1 read p1: recomputed
    assert "c1" not in plan.segments[0].outputs


def _if_between_layers():
    """x -> conv_a -> y1; If(cond) reads y1 from the outer scope; its output -> conv_b -> out."""
    rng = np.random.default_rng(0)
    branch = helper.make_graph([helper.make_node("Relu", ["y1"], ["t"])], "branch", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    inits = [helper.make_tensor("wa", TensorProto.FLOAT, [4, 3, 3, 3], rng.normal(size=108).tolist()),
             helper.make_tensor("wb", TensorProto.FLOAT, [2, 4, 1, 1], rng.normal(size=8).tolist()),
             helper.make_tensor("low", TensorProto.FLOAT, [], [-1e9])]
    nodes = [helper.make_node("ReduceMax", ["x"], ["xmax"], name="xmax", keepdims=0),  # a condition onnxsim
             helper.make_node("Greater", ["xmax", "low"], ["cond"], name="cond"),  # cannot fold away
             helper.make_node("Conv", ["x", "wa"], ["y1"], name="conv_a", pads=[1, 1, 1, 1]),
             helper.make_node("If", ["cond"], ["y2"], name="if", then_branch=branch, else_branch=branch),
             helper.make_node("Conv", ["y2", "wb"], ["out"], name="conv_b")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 2, 8, 8])],
                              initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_layer_behind_a_subgraph_read_comes_a_stage_later():
    """Stages count a subgraph's outer-scope reads as inputs: conv_b, fed through an If whose branches read
    conv_a's output, is fitted after conv_a is compensated (it used to share stage 1 with it: silero's
    decoder was fitted before its encoders)."""
    from qwt2_onnx.cwac.points import layer_stages

    assert layer_stages(_if_between_layers(), ["conv_a", "conv_b"]) == {"conv_a": 1, "conv_b": 2}


def test_staged_fit_through_a_subgraph_equals_whole_prefix_reruns(tmp_path):
    from qwt2_onnx import CompileConfig, QuantConfig, compile_model
    from qwt2_onnx.calib_data import CalibrationSet, InputSpec
    from qwt2_onnx.config import CwacConfig
    from qwt2_onnx.cwac.fit import staged_fit
    from qwt2_onnx.cwac.reference import prefix_staged_fit
    import onnx

    onnx.save(_if_between_layers(), tmp_path / "m.onnx")
    rng = np.random.default_rng(1)
    calib = [{"x": rng.normal(size=(1, 3, 8, 8)).astype(np.float32)} for _ in range(16)]
    res = compile_model(tmp_path / "m.onnx", calib, tmp_path / "q.onnx", CompileConfig(
        quant=QuantConfig(wbits=4), cwac=CwacConfig(enabled=False), holdout_samples=0), measure=False)
    data = CalibrationSet(lambda: iter(calib), InputSpec.from_model(res.float_model), "test", len(calib))
    cfg = CwacConfig(target="global")
    comps, fits = staged_fit(res.float_model, res.plain_model, res.plan, data, "global", cfg, batch_size=4)
    ref = prefix_staged_fit(res.float_model, res.plain_model, res.plan, data, cfg, batch_size=4)
    assert sorted(f.stage for f in fits) == [1, 2] and set(comps) == set(ref) and ref
    for name, comp in ref.items():
        np.testing.assert_array_equal(comps[name].gain, comp.gain)
        np.testing.assert_array_equal(comps[name].bias, comp.bias)
