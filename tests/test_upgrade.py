"""Upgrade mode: CWAC fitted and folded on a model onnxruntime's quantize_static already quantized,
on its own grid; and --cwac-params: compensation fitted elsewhere, folded with the same checks."""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from tiny_models import conv_net, linear_chains, saved_random_chain

from qwt2_onnx import CompileConfig, QwtError, compile_model
from qwt2_onnx.cli import main
from qwt2_onnx.config import CwacConfig
from qwt2_onnx.cwac.fold import build_graphs
from qwt2_onnx.inspect_ort import fusion_report
from qwt2_onnx.pipeline import upgrade_model
from qwt2_onnx.runtime import make_session


class _Reader(CalibrationDataReader):
    def __init__(self, feeds):
        self.it = iter(feeds)

    def get_next(self):
        return next(self.it, None)


def _ort_quantized(tmp_path, weight_type=QuantType.QInt8, n=24, per_channel=True):
    float_path = tmp_path / "f.onnx"
    onnx.save(conv_net(seed=3), float_path)
    rng = np.random.default_rng(3)
    calib = [{"x": rng.normal(size=(1, 3, 8, 8)).astype(np.float32)} for _ in range(n)]
    qdq_path = tmp_path / "ort.onnx"
    quantize_static(str(float_path), str(qdq_path), _Reader(calib), quant_format=QuantFormat.QDQ,
                    per_channel=per_channel, weight_type=weight_type)
    return float_path, qdq_path, calib


def _ops(m):
    return Counter(n.op_type for n in m.graph.node)


@pytest.mark.parametrize("weight_type", [QuantType.QInt8, QuantType.QInt4])
def test_upgrade_ort_quantize_static_model(tmp_path, weight_type):
    float_path, qdq_path, calib = _ort_quantized(tmp_path, weight_type)
    before = qdq_path.read_bytes()
    res = upgrade_model(qdq_path, float_path, calib, tmp_path / "up.onnx", CompileConfig(holdout_samples=8),
                        unfused_path=tmp_path / "u.onnx")
    assert qdq_path.read_bytes() == before
    original = onnx.load(qdq_path)
    assert len(res.plan.layers) == 4 and not res.plan.skipped
    # onnxruntime left conv2 without a bias and mm (a graph output) without a bias Add.  conv2 runs in float
    # on onnxruntime (its output feeds the residual Add unquantized), so its new bias is a float constant,
    # not an int32 DQ that would stay in onnxruntime's graph; mm's Add is the one extra op, and reported
    assert "conv2" in fusion_report(original, res.plan.integer_weights(original)).float_
    assert "float bias" in res.stages.fold.strategies["conv2"]
    inserted = res.stages.fold.inserted_ops
    by_name = {n.name: n.op_type for n in res.model.graph.node}
    assert _ops(res.model) - _ops(original) == Counter(by_name[n] for n in inserted)
    assert inserted == ["mm_cwac_Add"] or inserted == []
    assert res.fold_check.forced_max_rel["y"] <= 1e-5
    assert res.cwac.output_error[res.cwac.target] <= res.cwac.output_error["none"]
    # activation quantizers untouched: same scales and zero points as onnxruntime chose
    inits = lambda m: {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}  # noqa: E731
    a, b = inits(original), inits(res.model)
    for node in original.graph.node:
        if node.op_type == "QuantizeLinear":
            for name in node.input[1:]:
                np.testing.assert_array_equal(a[name], b[name])


def test_upgrade_ort_default_per_tensor_model(tmp_path):
    """onnxruntime's defaults quantize weights per tensor, with a per-tensor int32 bias DQ (a scalar scale);
    the fold makes both per channel (this failed in onnxruntime's DQ until the bias DQ got axis 0)."""
    float_path, qdq_path, calib = _ort_quantized(tmp_path, per_channel=False)
    res = upgrade_model(qdq_path, float_path, calib, tmp_path / "up.onnx", CompileConfig(holdout_samples=8),
                        measure=False)
    strategies = res.stages.fold.strategies
    assert all(s.startswith("per-tensor weight converted to per-channel") for s in strategies.values()), strategies
    assert "int32 bias" in strategies["conv1"] and "conv1" in res.cwac.compensations
    check = res.fold_check
    assert check.worst_forced <= 1e-5
    dq = {n.output[0]: n for n in res.model.graph.node if n.op_type == "DequantizeLinear"}
    conv1 = next(n for n in res.model.graph.node if n.name == "conv1")
    assert dq[conv1.input[2]].attribute[0].name == "axis" and dq[conv1.input[2]].attribute[0].i == 0


@pytest.mark.parametrize("per_channel", [False, True])
def test_upgrade_warns_of_per_tensor_weight_grids_set_by_outlier_channels(tmp_path, per_channel):
    """conv2's weight gets one output channel 40x wider than the rest: quantized per tensor, its other
    channels keep a few of the 128 steps, which no CWAC on that grid can undo; the upgrade says so, names
    the layer and the fix, and flags nothing when onnxruntime quantized the weights per channel."""
    model = conv_net(seed=3)
    w2 = next(t for t in model.graph.initializer if t.name == "w2")
    wide = onnx.numpy_helper.to_array(w2).copy()
    wide[0] *= 40
    w2.CopyFrom(onnx.numpy_helper.from_array(wide, "w2"))
    float_path = tmp_path / "f.onnx"
    onnx.save(model, float_path)
    rng = np.random.default_rng(3)
    calib = [{"x": rng.normal(size=(1, 3, 8, 8)).astype(np.float32)} for _ in range(24)]
    quantize_static(str(float_path), str(tmp_path / "ort.onnx"), _Reader(calib), quant_format=QuantFormat.QDQ,
                    per_channel=per_channel)
    np.savez(tmp_path / "c.npz", x=np.concatenate([c["x"] for c in calib]))
    res = CliRunner().invoke(main, ["compile", str(tmp_path / "ort.onnx"), "--float-model", str(float_path),
                                    "--calib", str(tmp_path / "c.npz"), "-o", str(tmp_path / "up.onnx")])
    assert res.exit_code == 0, res.output
    res_api = upgrade_model(tmp_path / "ort.onnx", float_path, calib, tmp_path / "up2.onnx",
                            CompileConfig(holdout_samples=8), measure=False)
    coarse = res_api.stages.plan.coarse_weight_grids
    if per_channel:
        assert coarse == {} and "per-tensor weight scales" not in res.output
        return
    assert set(coarse) == {"conv2"}, coarse
    c = coarse["conv2"]
    assert c["channels"] == 8 and c["grid_steps"] in (127, 128) and c["widest_channel_steps"] >= 126
    assert c["median_channel_steps"] < c["grid_steps"] / 8 and c["channels_below"] == 7
    assert "per-tensor weight scales set by a few wide channels in 1 layer(s)" in res.output
    assert "'conv2'" in res.output and "per_channel=True" in res.output


def test_float_bias_computes_what_the_int32_bias_dq_computes(tmp_path):
    """A bias-free layer onnxruntime runs in float gets its new bias as a float constant holding the values
    the int32 bias DQ would have produced: the fused graph computes bit for bit the same, with one op fewer."""
    float_path, qdq_path, calib = _ort_quantized(tmp_path)
    res = upgrade_model(qdq_path, float_path, calib, tmp_path / "up.onnx", CompileConfig(holdout_samples=8),
                        measure=False)
    assert "conv2" in res.cwac.compensations
    _, with_dq, dq_stats = build_graphs(res.plain_model, res.cwac.compensations)
    _, with_float, float_stats = build_graphs(res.plain_model, res.cwac.compensations, float_bias=frozenset({"conv2"}))
    assert dq_stats.inserted_ops == ["conv2_cwac_bias_DequantizeLinear", "mm_cwac_Add"]
    assert float_stats.inserted_ops == ["mm_cwac_Add"]
    assert _ops(with_dq) - _ops(with_float) == Counter({"DequantizeLinear": 1})
    feed = {"x": np.concatenate([c["x"] for c in calib])}
    a, b = (make_session(m, optimized=False).run(None, feed)[0] for m in (with_dq, with_float))
    np.testing.assert_array_equal(a, b)


def test_qdq_model_passed_as_float_is_explained(tmp_path):
    _, qdq_path, calib = _ort_quantized(tmp_path)
    with pytest.raises(QwtError, match="already quantized") as e:
        compile_model(qdq_path, calib, tmp_path / "o.onnx")
    assert "--float-model" in str(e.value)
    assert not (tmp_path / "o.onnx").exists()


def test_cli_upgrade_mode(tmp_path):
    float_path, qdq_path, calib = _ort_quantized(tmp_path)
    np.savez(tmp_path / "c.npz", x=np.concatenate([c["x"] for c in calib]))
    res = CliRunner().invoke(main, ["compile", str(qdq_path), "--float-model", str(float_path),
                                    "--calib", str(tmp_path / "c.npz")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "ort.cwac.onnx").exists() and "CWAC: target" in res.output


def test_cwac_params_are_folded_exactly(tmp_path):
    onnx.save(conv_net(seed=4), tmp_path / "m.onnx")
    rng = np.random.default_rng(4)
    calib = [{"x": rng.normal(size=(1, 3, 8, 8)).astype(np.float32)} for _ in range(12)]
    params = {"w1:gain": rng.uniform(0.8, 1.2, 8), "w1:bias": rng.normal(0, 0.1, 8),
              "wg:gain": -rng.uniform(0.8, 1.2, 16), "wg:bias": rng.normal(0, 0.1, 16)}
    np.savez(tmp_path / "p.npz", **params)
    cfg = CompileConfig(cwac=CwacConfig(params=str(tmp_path / "p.npz")), holdout_samples=4)
    res = compile_model(tmp_path / "m.onnx", calib, tmp_path / "q.onnx", cfg, unfused_path=tmp_path / "u.onnx")
    assert res.cwac.target == "params" and set(res.cwac.compensations) == {"conv1", "gemm"}
    np.testing.assert_array_equal(res.cwac.compensations["gemm"].gain, params["wg:gain"].astype(np.float32))
    assert res.fold_check.forced_max_rel["y"] <= 1e-5
    assert _ops(res.model) == _ops(res.plain_model)


def test_cwac_params_with_unknown_names_or_wrong_sizes(tmp_path):
    onnx.save(conv_net(seed=4), tmp_path / "m.onnx")
    calib = [{"x": np.ones((1, 3, 8, 8), np.float32)} for _ in range(4)]
    for params, match in (({"nope:gain": np.ones(8)}, "match no quantized layer"),
                          ({"w1:gain": np.ones(5)}, "do not match its 8 output channels")):
        np.savez(tmp_path / "p.npz", **params)
        cfg = CompileConfig(cwac=CwacConfig(params=str(tmp_path / "p.npz")), holdout_samples=0)
        with pytest.raises(QwtError, match=match):
            compile_model(tmp_path / "m.onnx", calib, tmp_path / "q.onnx", cfg)
        assert not (tmp_path / "q.onnx").exists()


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chain=linear_chains(), weight_type=st.sampled_from([QuantType.QInt8, QuantType.QInt4]),
       per_channel=st.booleans(), symmetric=st.booleans(), reduce_range=st.booleans(),
       activations=st.sampled_from(["u8", "s8", "s8 symmetric"]), kinds=st.sets(st.sampled_from(["neg", "zero"])),
       seed=st.integers(0, 2**16))
def test_upgrade_folds_random_gains_on_whatever_quantize_static_wrote(tmp_path_factory, chain, weight_type,
                                                                      per_channel, symmetric, reduce_range,
                                                                      activations, kinds, seed):
    """Random layer chains quantized by onnxruntime with per-tensor or per-channel, symmetric (full range: rows
    holding -128 / -8) or asymmetric (nonzero zero points) weights, int8 or int4, uint8 or int8 (symmetric or
    not) activations; random gains (negative and zero included) folded through --cwac-params.  Every channel
    is folded or left alone and counted, never wrapped: fused and unfused agree given the same codes, every op
    the fold added is reported, and onnxruntime's activation quantizers stay as they were.  The fit on the
    same model is never worse on the held-out part."""
    tmp = tmp_path_factory.mktemp("upgrade_random")
    calib, rng, _ = saved_random_chain(chain, seed, tmp / "f.onnx", 12)
    quantize_static(str(tmp / "f.onnx"), str(tmp / "ort.onnx"), _Reader(calib), quant_format=QuantFormat.QDQ,
                    per_channel=per_channel, weight_type=weight_type, reduce_range=reduce_range,
                    activation_type=QuantType.QUInt8 if activations == "u8" else QuantType.QInt8,
                    extra_options={"WeightSymmetric": symmetric,
                                   "ActivationSymmetric": activations == "s8 symmetric"})
    before = (tmp / "ort.onnx").read_bytes()
    # the fit itself first: never worse on the held-out part, folded exactly; its plan names the layers
    fit = upgrade_model(tmp / "ort.onnx", tmp / "f.onnx", calib, tmp / "fit.onnx", CompileConfig(holdout_samples=4),
                        measure=False)
    assert fit.cwac.output_error[fit.cwac.target] <= fit.cwac.output_error["none"]
    check = fit.fold_check
    assert check.worst_forced <= 1e-5
    inits = {t.name: t for t in fit.float_model.graph.initializer}
    params = {}
    for lp in fit.plan.layers:
        c = inits[lp.weight].dims[lp.axis]
        g = rng.uniform(0.5, 1.5, c) * (rng.choice([1, -1], c) if "neg" in kinds else 1)
        if "zero" in kinds:
            g[rng.integers(0, c)] = 0.0
        params[f"{lp.weight}:gain"], params[f"{lp.weight}:bias"] = g, rng.normal(0, 0.3, c)
    np.savez(tmp / "p.npz", **params)
    res = upgrade_model(tmp / "ort.onnx", tmp / "f.onnx", calib, tmp / "up.onnx",
                        CompileConfig(cwac=CwacConfig(params=str(tmp / "p.npz")), holdout_samples=4), measure=False)
    assert (tmp / "ort.onnx").read_bytes() == before
    fold = res.stages.fold
    assert set(res.cwac.compensations) == {lp.node for lp in fit.plan.layers}
    assert res.fold_check.worst_forced <= 1e-5
    original = onnx.load(tmp / "ort.onnx")
    by_name = {n.name: n.op_type for n in res.model.graph.node}
    assert _ops(res.model) - _ops(original) == Counter(by_name[n] for n in fold.inserted_ops)
    a = {t.name: onnx.numpy_helper.to_array(t) for t in original.graph.initializer}
    b = {t.name: onnx.numpy_helper.to_array(t) for t in res.model.graph.initializer}
    for node in original.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] not in a:  # an activation quantizer
            for name in node.input[1:]:
                np.testing.assert_array_equal(a[name], b[name])


@pytest.mark.parametrize("dtype,axis", [(np.int8, None), (np.int8, 0), (np.uint8, 1), ("int4", 0)])
def test_folded_constant_quantizer_codes_are_onnxruntimes(dtype, axis):
    """Q(constant) folds to exactly the codes onnxruntime's QuantizeLinear computes, also on float32 ties
    (x / scale exactly k + 0.5 in float32 but not in float64: a float64 fold moved one code of one of
    Model Optimizer's weights, and a recognizer's Chinese accuracy 2 points)."""
    import ml_dtypes
    from onnx import TensorProto, helper, numpy_helper

    from qwt2_onnx.passes.fold_constant_quantizers import quantize
    from qwt2_onnx.quant import integer_range

    rng = np.random.default_rng(0)
    int4 = dtype == "int4"
    np_dtype = ml_dtypes.int4 if int4 else np.dtype(dtype)
    lo, hi = integer_range(np_dtype)
    shape = (6, 40)
    channels = shape[axis] if axis is not None else 1
    scale = rng.uniform(0.001, 0.1, size=channels).astype(np.float32)
    zp = rng.integers(lo // 4, hi // 4 + 1, size=channels).astype(np_dtype)
    bshape = [1, 1] if axis is None else [-1 if i == axis else 1 for i in range(2)]
    s, k = scale.reshape(bshape), rng.integers(lo, hi, size=shape)
    x = ((k + 0.5) * s).astype(np.float32)  # ties in float32 arithmetic, some not in float64
    x[:, ::3] = rng.normal(scale=0.5, size=x[:, ::3].shape).astype(np.float32) * s.max() * hi
    split = np.rint(x / s) != np.rint(x.astype(np.float64) / s.astype(np.float64))
    assert split.any()  # the case the float32 arithmetic is for is in the data
    attrs = {} if axis is None else {"axis": axis}
    sc, z = (scale[0], zp[0]) if axis is None else (scale, zp)
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **attrs),
         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], **attrs)], "q",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        [numpy_helper.from_array(np.asarray(sc, np.float32), "s"), numpy_helper.from_array(np.asarray(z), "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    got_ort = make_session(model, optimized=False).run(None, {"x": x})[0]
    q = quantize(x, np.asarray(sc), np.asarray(z), -1 if axis is None else axis)
    ours = (q.astype(np.float32) - np.asarray(z).astype(np.float32).reshape(bshape)) * s
    np.testing.assert_array_equal(ours, got_ort)
