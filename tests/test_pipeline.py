"""End-to-end behaviour of compile_model on tiny models built in code."""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from qwt2_onnx import CompileConfig, QuantConfig, QwtError, compile_model
from tiny_models import calib_npz, conv_net, matmul_add, mlp_with_constants


def run(model, x, optimized):
    so = ort.SessionOptions()
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    src = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def sqnr(ref, x):
    return 10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / np.sum((x.astype(np.float64) - ref) ** 2))


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "tiny.onnx"
    onnx.save(conv_net(), path)
    return path, calib_npz(tmp_path / "calib.npz")


def test_compile_structure_and_numerics(tiny, tmp_path):
    model, calib = tiny
    before = model.read_bytes()
    res = compile_model(model, calib, tmp_path / "out.onnx")
    assert model.read_bytes() == before, "input model must never be modified"
    q = onnx.load(tmp_path / "out.onnx")
    onnx.checker.check_model(q, full_check=True)
    ops = Counter(n.op_type for n in q.graph.node)
    assert ops["BatchNormalization"] == 0
    # 4 layers: 4 weight DQ, 4 int32 bias DQ (conv1 has a bias after the BN fold, gemm has one, bias-less
    # conv2 gets a zero bias, the 2-D bias-free MatMul a zero-bias Add), activations x, r1 (shared by conv2
    # and the Add), c2 (conv2's output point), f, g1
    assert ops["QuantizeLinear"] == 5 and ops["DequantizeLinear"] == 4 + 4 + 5
    assert ops["Add"] == 2  # the model's residual Add and mm's bias Add
    assert len(res.fusion.integer) == 4, res.fusion.float_
    x = np.random.default_rng(7).normal(size=(20, 3, 8, 8)).astype(np.float32)
    ref = run(conv_net(), x, True)
    sim, dep = run(str(tmp_path / "out.onnx"), x, False), run(str(tmp_path / "out.onnx"), x, True)
    assert sqnr(ref, sim) > 30
    # 7-bit weights: the integer kernels cannot saturate, deployed == simulated up to output rounding
    assert np.max(np.abs(dep - sim)) <= 1e-3 * np.max(np.abs(sim))


def test_weights_are_narrow_range_per_channel(tiny, tmp_path):
    model, calib = tiny
    for wbits, full, qmax in [(8, False, 63), (8, True, 127), (6, False, 31)]:
        cfg = CompileConfig(quant=QuantConfig(wbits=wbits, avx2_safe_weights=not full))
        compile_model(model, calib, tmp_path / "o.onnx", cfg, measure=False)
        q = onnx.load(tmp_path / "o.onnx")
        inits = {t.name: onnx.numpy_helper.to_array(t) for t in q.graph.initializer}
        w = inits["w2_quantized"]
        assert w.dtype == np.int8 and np.abs(w).max() == qmax and w.min() >= -qmax
        # each output channel uses the full range: per-channel on axis 0
        assert np.all(np.abs(w).reshape(8, -1).max(axis=1) == qmax)
        assert inits["w2_scale"].shape == (8,)


def test_int32_bias_scale_is_exact_product(tiny, tmp_path):
    model, calib = tiny
    compile_model(model, calib, tmp_path / "o.onnx", measure=False)
    q = onnx.load(tmp_path / "o.onnx")
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in q.graph.initializer}
    assert inits["bg_quantized"].dtype == np.int32
    expected = (np.float32(inits["f_scale"]) * inits["wg_scale"]).astype(np.float32)
    assert np.array_equal(inits["bg_scale"], expected)


def test_gemm_transB0_and_matmul_axis_and_constant_nodes(tmp_path):
    path = tmp_path / "mlp.onnx"
    onnx.save(mlp_with_constants(opset=11), path)
    calib = calib_npz(tmp_path / "c.npz", shape=(4,))
    res = compile_model(path, calib, tmp_path / "o.onnx")
    q = onnx.load(tmp_path / "o.onnx")
    assert q.opset_import[0].version == 13
    dq_axes = {n.name: n.attribute[0].i for n in q.graph.node if n.op_type == "DequantizeLinear" and n.attribute}
    axes = {k: v for k, v in dq_axes.items() if "weight" in k}
    assert sorted(axes.values()) == [1, 1], axes  # MatMul [K,N] and Gemm transB=0 [K,N]: output axis 1
    assert res.stages.normalize.constants_to_initializers == 2
    assert res.stages.normalize.renamed_nodes == 5
    assert all(n.name for n in q.graph.node)


def test_exclusions_and_unmatched_patterns(tiny, tmp_path):
    model, calib = tiny
    cfg = CompileConfig(quant=QuantConfig(exclude_names=("re:conv[12]", "nothing_*"), exclude_op_types=("MatMul",)))
    res = compile_model(model, calib, tmp_path / "o.onnx", cfg, measure=False)
    assert [lp.node for lp in res.plan.layers] == ["gemm"]
    assert res.plan.skipped == {"conv1": "excluded by 're:conv[12]'", "conv2": "excluded by 're:conv[12]'",
                                "mm": "excluded op type MatMul"}
    assert res.plan.unmatched_patterns == ["nothing_*"]


def test_no_quantizable_layer_is_a_clear_error(tiny, tmp_path):
    model, calib = tiny
    cfg = CompileConfig(quant=QuantConfig(exclude_names=("*",)))
    with pytest.raises(QwtError, match="no layer that can be quantized"):
        compile_model(model, calib, tmp_path / "o.onnx", cfg)
    assert not (tmp_path / "o.onnx").exists()


def test_trt_target_rules(tiny, tmp_path):
    model, calib = tiny
    res = compile_model(model, calib, tmp_path / "o.onnx", CompileConfig(quant=QuantConfig(target="trt")), measure=False)
    q = onnx.load(tmp_path / "o.onnx")
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in q.graph.initializer}
    zps = [v for k, v in inits.items() if k.endswith("_zero_point")]
    assert zps and all(z.dtype == np.int8 and not z.any() for z in zps)
    assert not any(v.dtype == np.int32 for v in inits.values()), "TensorRT needs float biases"
    assert inits["b1"].dtype == np.float32 if "b1" in inits else True
    assert np.abs(inits["w2_quantized"]).max() == 127, "trt: full narrow 8-bit range"
    assert res.plan.layers


def test_trt_lint_rejects_asymmetric_graph(tiny, tmp_path):
    import onnx_graphsurgeon as gs

    from qwt2_onnx.passes.trt_lint import TrtLintPass

    model, calib = tiny
    compile_model(model, calib, tmp_path / "o.onnx", measure=False)  # ort target: u8 + int32 bias
    problems = TrtLintPass()(gs.import_onnx(onnx.load(tmp_path / "o.onnx"))).stats["violations"]
    assert any("uint8" in p for p in problems) and any("int32" in p for p in problems)


def test_int4_weights_opset21(tiny, tmp_path):
    model, calib = tiny
    res = compile_model(model, calib, tmp_path / "o.onnx", CompileConfig(quant=QuantConfig(wbits=4)))
    q = onnx.load(tmp_path / "o.onnx")
    assert q.opset_import[0].version >= 21
    w = next(t for t in q.graph.initializer if t.name == "w2_quantized")
    assert w.data_type == onnx.TensorProto.INT4
    vals = onnx.numpy_helper.to_array(w).astype(np.int8)
    assert vals.min() >= -7 and vals.max() <= 7
    x = np.random.default_rng(3).normal(size=(8, 3, 8, 8)).astype(np.float32)
    assert sqnr(run(conv_net(), x, True), run(str(tmp_path / "o.onnx"), x, False)) > 12
    assert res.fidelity.simulated["y"].cosine > 0.95


def test_output_equal_input_refused(tiny):
    model, calib = tiny
    before = model.read_bytes()
    with pytest.raises(QwtError, match="would overwrite the input model"):
        compile_model(model, calib, model)
    assert model.read_bytes() == before


def test_missing_output_dir_leaves_nothing(tiny, tmp_path):
    model, calib = tiny
    with pytest.raises(QwtError, match="output directory does not exist"):
        compile_model(model, calib, tmp_path / "missing" / "o.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.npz", "tiny.onnx"]


def test_deterministic_bytes(tiny, tmp_path):
    model, calib = tiny
    compile_model(model, calib, tmp_path / "a.onnx", measure=False)
    compile_model(model, calib, tmp_path / "b.onnx", measure=False)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_matmul_add_bias_becomes_int32_and_fuses_to_qgemm(tmp_path):
    onnx.save(matmul_add(), tmp_path / "m.onnx")
    res = compile_model(tmp_path / "m.onnx", calib_npz(tmp_path / "c.npz", shape=(6,)), tmp_path / "o.onnx")
    lp = res.plan.layers[0]
    assert (lp.bias, lp.bias_node, lp.bias_input) == ("b", "add", 1)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(tmp_path / "o.onnx").graph.initializer}
    assert inits["b_quantized"].dtype == np.int32
    assert res.fusion.integer == {"mm": "QGemm"}
    assert res.fidelity.deployed["y"].sqnr_db > 25  # 7-bit weights, u8 input: ~30 dB on this layer


def test_onnxsim_failure_is_a_note_not_an_error(tiny, tmp_path, monkeypatch):
    import onnxsim

    def broken(*a, **k):
        raise RuntimeError("simulated onnxsim crash")

    monkeypatch.setattr(onnxsim, "simplify", broken)
    model, calib = tiny
    res = compile_model(model, calib, tmp_path / "o.onnx", measure=False)
    assert res.stages.simplify.onnxsim.startswith("skipped: RuntimeError: simulated onnxsim crash")
    assert len(res.plan.layers) == 4


def test_per_sample_shapes_and_symbolic_dims(tmp_path):
    onnx.save(conv_net(hw="H"), tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    samples = [{"x": rng.normal(size=(1, 3, s, s)).astype(np.float32)} for s in (6, 8, 8, 12, 5) * 8]
    res = compile_model(tmp_path / "m.onnx", samples, tmp_path / "o.onnx")
    assert len(res.plan.layers) == 4 and res.fidelity.simulated["y"].sqnr_db > 25


def test_opset11_model_is_upgraded_and_loads(tmp_path):
    onnx.save(conv_net(opset=11), tmp_path / "m.onnx")
    res = compile_model(tmp_path / "m.onnx", calib_npz(tmp_path / "c.npz"), tmp_path / "o.onnx")
    assert res.stages.normalize.opset == "11->13"
    assert res.fidelity.deployed["y"].sqnr_db > 30


@pytest.mark.parametrize("n, holdout, expect", [(40, 16, (24, 16, True)), (20, 16, (20, 16, False)),
                                                (24, 0, (24, 16, False)), (8, 0, (8, 8, False))])
def test_checks_run_on_held_out_samples_or_on_up_to_16_calibration_samples(n, holdout, expect):
    from qwt2_onnx.calib_data import InputSpec, open_calibration
    from qwt2_onnx.pipeline import split_holdout

    rng = np.random.default_rng(0)
    data = open_calibration([{"x": rng.normal(size=(1, 3, 8, 8)).astype(np.float32)} for _ in range(n)],
                            InputSpec.from_model(conv_net()))
    calib, check, held_out = split_holdout(data, holdout)
    assert (calib.length, sum(1 for _ in check), held_out) == expect


def test_simplify_does_not_import_torch_and_torch_still_imports(tmp_path):
    """onnxsim's package import pulls in torch for a bridge it cannot use; the simplify pass hides torch
    meanwhile (1.2 s of every compile), and a later ``import torch`` works as usual."""
    import subprocess
    import sys

    onnx.save(conv_net(), tmp_path / "m.onnx")
    code = ("import sys, onnx\n"
            "from qwt2_onnx.passes.simplify import SimplifyPass\n"
            f"r = SimplifyPass()(onnx.load({str(tmp_path / 'm.onnx')!r}))\n"
            "assert r.stats['onnxsim'].endswith('nodes'), r.stats\n"
            "assert 'torch' not in sys.modules\n"
            "import importlib.util\n"
            "if importlib.util.find_spec('torch') is not None:  # torch is an optional extra\n"
            "    import torch\n"
            "    assert torch.zeros(1).shape == (1,)\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_a_stage_failure_names_the_node_it_failed_on(tmp_path):
    """A model that passes every static check but fails at run time on the calibration data (a Reshape to
    [-1, 3] of 4 values): the calibrate stage's error names the stage and onnxruntime's failing node."""
    from onnx import TensorProto, helper, numpy_helper

    from qwt2_onnx.errors import StageError

    w = numpy_helper.from_array(np.ones((3, 2), np.float32), "w")
    shape = numpy_helper.from_array(np.array([-1, 3], np.int64), "shape")
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["r"], name="the_reshape"),
         helper.make_node("MatMul", ["r", "w"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", "k"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w, shape])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "m.onnx")
    calib = [{"x": np.ones((1, 4), np.float32)} for _ in range(4)]
    with pytest.raises(StageError) as info:
        compile_model(tmp_path / "m.onnx", calib, tmp_path / "q.onnx", CompileConfig(simplify=False), measure=False)
    assert info.value.stage == "calibrate" and info.value.node == "the_reshape"
    assert "stage 'calibrate' failed on node 'the_reshape'" in str(info.value)
    assert not (tmp_path / "q.onnx").exists()
