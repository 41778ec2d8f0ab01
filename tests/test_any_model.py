"""Every real model a user brings compiles: one tiny model per class of real-world quirk (issue 20).

Each class was a traceback on a real model: a batch fixed at 1, wrong or incomplete graph-output
declarations, a broadcast Gemm bias, a sparse initializer, a zero-size weight, float16 / bfloat16 /
float64 models.  Each test builds the smallest model that has the quirk, compiles it through the CLI and
asserts exit 0, a passing check, and outputs that track float; the refusals assert exit 2 and the message.
Exit codes: 3 (and only 3) for our own bugs.
"""
from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from qwt2_onnx.cli import main
from qwt2_onnx.runtime import make_session
from test_robustness import compile_fails_cleanly
from tiny_models import calib_npz, conv_net


def _compile_ok(tmp, model: onnx.ModelProto, calib, *args) -> tuple[onnx.ModelProto, str]:
    """Compile through the CLI: exit 0, a PASSED check, no traceback; the written model."""
    onnx.save(model, tmp / "m.onnx")
    res = CliRunner().invoke(main, ["compile", str(tmp / "m.onnx"), "--calib", str(calib), "-o", str(tmp / "q.onnx"),
                                    *map(str, args)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "Traceback" not in res.output and "PASSED" in res.output, res.output
    assert json.loads((tmp / "q.report.json").read_text())["passed"] is True
    return onnx.load(tmp / "q.onnx"), res.output


def _tracks_float(float_model, qmodel, feed, min_cos: float) -> None:
    (f,), (q,) = make_session(float_model).run(None, feed), make_session(qmodel).run(None, feed)
    assert q.dtype == f.dtype and q.shape == f.shape
    f64, q64 = f.astype(np.float64).ravel(), q.astype(np.float64).ravel()
    cos = f64 @ q64 / (np.linalg.norm(f64) * np.linalg.norm(q64))
    assert cos > min_cos, cos


def _mlp(dtype=np.float32, bias_shape=(6,), w0=(4, 6), seed=0) -> onnx.ModelProto:
    """x[N,4] ─► Gemm(w, b) ─► Relu ─► MatMul(w2) ─► y[N,3], all in ``dtype``."""
    rng = np.random.default_rng(seed)
    tt = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["h"], name="gemm"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm")]
    inits = [numpy_helper.from_array(rng.normal(size=w0).astype(dtype), "w"),
             numpy_helper.from_array(rng.normal(size=bias_shape).astype(dtype), "b"),
             numpy_helper.from_array(rng.normal(size=(w0[1], 3)).astype(dtype), "w2")]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", tt, ["N", 4])],
                          [helper.make_tensor_value_info("y", tt, ["N", 3])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m


def _vec_calib(path, dtype=np.float32, n=64):
    np.savez(path, x=np.random.default_rng(1).normal(size=(n, 4)).astype(dtype))
    return path


# --- a batch fixed at 1: compile, check and diff honour it ------------------------------------------------------

def test_fixed_batch_of_one_through_compile_check_and_diff(tmp_path):
    model = conv_net(batch=1)
    calib = calib_npz(tmp_path / "c.npz")
    args = ["--emit-unfused", tmp_path / "u.onnx", "--batch-size", "8"]
    qmodel, _ = _compile_ok(tmp_path, model, calib, *args)
    assert qmodel.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    for cmd in (["check", tmp_path / "q.onnx", tmp_path / "u.onnx"], ["diff", tmp_path / "m.onnx", tmp_path / "q.onnx",
                                                                       "--rtol", "0.5"]):
        res = CliRunner().invoke(main, [*map(str, cmd), "--data", str(calib), "--batch-size", "8"])
        assert res.exit_code == 0, res.output
        assert "Traceback" not in res.output and "PASSED" in res.output


# --- graph-output declarations that are wrong or incomplete: repaired at load ------------------------------------

def _declare(model: onnx.ModelProto, how: str) -> onnx.ModelProto:
    tt = model.graph.output[0].type.tensor_type
    if how == "no_shape":
        tt.ClearField("shape")
    elif how == "rank0":
        tt.shape.Clear()
    elif how == "wrong_rank":
        del tt.shape.dim[1:]
    elif how == "wrong_dim":
        tt.shape.dim[1].dim_value = 7
    elif how == "fixed_but_dynamic":
        tt.shape.dim[0].Clear()
        tt.shape.dim[0].dim_value = 1
    elif how == "stale_value_info":
        model.graph.value_info.append(helper.make_tensor_value_info("g1", TensorProto.FLOAT, [1, 99]))
    return model


@pytest.mark.parametrize("how", ["no_shape", "rank0", "wrong_rank", "wrong_dim", "fixed_but_dynamic", "stale_value_info"])
def test_wrong_declared_output_types_are_repaired_at_load(tmp_path, how):
    model = _declare(conv_net(), how)
    qmodel, out = _compile_ok(tmp_path, model, calib_npz(tmp_path / "c.npz"))
    onnx.checker.check_model(qmodel, full_check=True)
    dims = qmodel.graph.output[0].type.tensor_type.shape.dim
    assert len(dims) == 2 and dims[1].dim_value == 5
    if how != "stale_value_info":
        assert "declaration repaired" in out
    feed = {"x": np.random.default_rng(3).normal(size=(4, 3, 8, 8)).astype(np.float32)}
    _tracks_float(conv_net(), qmodel, feed, 0.99)


# --- constants in unusual forms ----------------------------------------------------------------------------------

@pytest.mark.parametrize("bias_shape", [(1,), (), (1, 6)])
def test_gemm_bias_that_broadcasts_is_made_per_channel(tmp_path, bias_shape):
    model = _mlp(bias_shape=bias_shape)
    qmodel, _ = _compile_ok(tmp_path, model, _vec_calib(tmp_path / "c.npz"))
    gemm = next(n for n in qmodel.graph.node if n.op_type == "Gemm")
    assert any(n.op_type == "DequantizeLinear" and n.output[0] == gemm.input[2] for n in qmodel.graph.node)
    x = np.random.default_rng(4).normal(size=(16, 4)).astype(np.float32)
    _tracks_float(model, qmodel, {"x": x}, 0.99)


def test_sparse_initializer_weight(tmp_path):
    model = _mlp()
    w = numpy_helper.to_array(model.graph.initializer[0]).copy()
    w[np.abs(w) < 0.5] = 0
    idx = np.flatnonzero(w).astype(np.int64)
    sparse = helper.make_sparse_tensor(numpy_helper.from_array(w.ravel()[idx], "w"),
                                       numpy_helper.from_array(idx, "w_idx"), list(w.shape))
    del model.graph.initializer[0]
    model.graph.sparse_initializer.append(sparse)
    qmodel, out = _compile_ok(tmp_path, model, _vec_calib(tmp_path / "c.npz"))
    assert "quantized 2 layers" in out and not qmodel.graph.sparse_initializer
    dense = _mlp()
    dense.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "w"))
    _tracks_float(dense, qmodel, {"x": np.random.default_rng(4).normal(size=(16, 4)).astype(np.float32)}, 0.99)


def test_zero_size_weight_is_left_float_with_a_reason(tmp_path):
    """x ─► MatMul(w[4,0]) ─► z[N,0] ─┐
       x ─► MatMul(w[4,3]) ─► h ──────┴► Concat ─► y[N,3]"""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["z"], name="empty"),
             helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Concat", ["h", "z"], ["y"], name="cat", axis=1)]
    g = helper.make_graph(nodes, "z", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                          [numpy_helper.from_array(np.zeros((4, 0), np.float32), "w0"),
                           numpy_helper.from_array(rng.normal(size=(4, 3)).astype(np.float32), "w")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    _, out = _compile_ok(tmp_path, model, _vec_calib(tmp_path / "c.npz"))
    assert "quantized 1 layers" in out and "zero_size_weight" in out


# --- float16 / bfloat16 / float64: float32 inside, the model's own interface kept -------------------------------

@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_float16_and_float64_models_compile_with_their_interface(tmp_path, dtype):
    model = _mlp(dtype=dtype)
    qmodel, out = _compile_ok(tmp_path, model, _vec_calib(tmp_path / "c.npz", dtype))
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    assert qmodel.graph.input[0].type.tensor_type.elem_type == elem
    assert qmodel.graph.output[0].type.tensor_type.elem_type == elem
    assert not [t.name for t in qmodel.graph.initializer if t.data_type == elem], "weights are float32 inside"
    x = np.random.default_rng(4).normal(size=(16, 4)).astype(dtype)
    _tracks_float(model, qmodel, {"x": x}, 0.99)


def test_bfloat16_weights_behind_a_cast(tmp_path):
    """w_bf16 ─► Cast(to=float) ─► MatMul(x, ·) ─► Relu ─► y"""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 3)).astype(np.float32)
    wb = helper.make_tensor("wb", TensorProto.BFLOAT16, [4, 3],
                            w.astype(ml_dtypes.bfloat16).view(np.uint16).tobytes(), raw=True)
    nodes = [helper.make_node("Cast", ["wb"], ["w"], to=TensorProto.FLOAT, name="cast"),
             helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"), helper.make_node("Relu", ["h"], ["y"])]
    g = helper.make_graph(nodes, "b", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], [wb])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    qmodel, out = _compile_ok(tmp_path, model, _vec_calib(tmp_path / "c.npz"))
    assert "quantized 1 layers" in out
    _tracks_float(model, qmodel, {"x": rng.normal(size=(16, 4)).astype(np.float32)}, 0.99)


def test_bfloat16_inputs_are_refused_naming_the_type(workdir):
    m = _mlp()
    m.graph.input[0].type.tensor_type.elem_type = TensorProto.BFLOAT16
    onnx.save(m, workdir / "m.onnx")
    compile_fails_cleanly(workdir, workdir / "m.onnx", "--calib", _vec_calib(workdir / "c.npz"), "-o",
                          workdir / "o.onnx", message="element type BFLOAT16")


def test_four_bit_activations_are_not_offered(workdir):
    onnx.save(conv_net(), workdir / "m.onnx")
    res = CliRunner().invoke(main, ["compile", str(workdir / "m.onnx"), "--calib", str(calib_npz(workdir / "c.npz")),
                                    "--abits", "4"])
    assert res.exit_code == 2 and "'4' is not one of" in res.output
    from qwt2_onnx import QwtError
    from qwt2_onnx.config import QuantConfig
    with pytest.raises(QwtError, match="4-bit activations"):
        QuantConfig(abits=4)


# --- exit codes: 3 for our bugs, and only for them ------------------------------------------------------------

def test_internal_error_exits_3_with_a_line_and_the_traceback(workdir, monkeypatch):
    import qwt2_onnx.pipeline as pipeline

    def broken(*a, **k):
        raise ZeroDivisionError("a bug of ours")
    monkeypatch.setattr(pipeline, "plan_quantization", broken)
    onnx.save(conv_net(), workdir / "m.onnx")
    res = CliRunner().invoke(main, ["compile", str(workdir / "m.onnx"), "--calib",
                                                    str(calib_npz(workdir / "c.npz")), "-o", str(workdir / "o.onnx")])
    assert res.exit_code == 3, res.output
    assert res.stderr.startswith("internal error: this is a bug in qwt2-onnx")
    assert "Traceback" in res.stderr and "ZeroDivisionError: a bug of ours" in res.stderr
    assert not (workdir / "o.onnx").exists()


# --- inputs without a free leading batch axis: a recurrent state [2, N, 3], a scalar ----------------------------

def test_state_with_inner_batch_axis_and_scalar_input(tmp_path):
    """x[N,4] ─► MatMul(w) ─► h ─┐
       state[2,N,3] ─► ReduceSum(axis 0) ─► Mul(Cast(sr)) ─► Add ─► y[N,3]   (sr: an int64 scalar)
    Calibration arrays one rank above the input hold whole inputs: state [n, 2, 1, 3], sr [n]."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("ReduceSum", ["state", "axes"], ["s"], name="sum", keepdims=0),
             helper.make_node("Cast", ["sr"], ["srf"], to=TensorProto.FLOAT, name="cast"),
             helper.make_node("Mul", ["s", "srf"], ["ss"], name="scale"),
             helper.make_node("Add", ["h", "ss"], ["y"], name="add")]
    g = helper.make_graph(nodes, "vad", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
                                         helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "N", 3]),
                                         helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                          [numpy_helper.from_array(rng.normal(size=(4, 3)).astype(np.float32), "w"),
                           numpy_helper.from_array(np.array([0], np.int64), "axes")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    n = 40
    np.savez(tmp_path / "c.npz", x=rng.normal(size=(n, 4)).astype(np.float32),
             state=rng.normal(size=(n, 2, 1, 3)).astype(np.float32), sr=np.full(n, 2, np.int64))
    qmodel, _ = _compile_ok(tmp_path, model, tmp_path / "c.npz", "--batch-size", "8")
    data = np.load(tmp_path / "c.npz")
    fs, qs = make_session(model), make_session(qmodel)
    pairs = [(fs.run(None, feed)[0], qs.run(None, feed)[0]) for feed in
             ({"x": data["x"][i:i + 1], "state": data["state"][i], "sr": np.asarray(data["sr"][i])} for i in range(n))]
    f, q = (np.concatenate(z).ravel().astype(np.float64) for z in zip(*pairs))
    assert f @ q / (np.linalg.norm(f) * np.linalg.norm(q)) > 0.99


@pytest.mark.parametrize("seed", range(4))
def test_fold_check_at_an_output_far_below_its_inputs(tmp_path, seed):
    """y = 1 − Sigmoid(x·w + 10): |y| ~ 4.5e-5 carries the absolute rounding of values near 1 (2^-24).  The
    fold check judges such an output with a floor of a few float32 ulps of 1, its layers relatively."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Add", ["h", "b"], ["hb"], name="bias"),
             helper.make_node("Sigmoid", ["hb"], ["p"], name="sig"),
             helper.make_node("Sub", ["one", "p"], ["y"], name="complement")]
    g = helper.make_graph(nodes, "tiny_out", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                          [numpy_helper.from_array(rng.normal(size=(4, 3)).astype(np.float32) * 0.5, "w"),
                           numpy_helper.from_array(np.full(3, 10.0, np.float32), "b"),
                           numpy_helper.from_array(np.array(1.0, np.float32), "one")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    _compile_ok(tmp_path, model, _vec_calib(tmp_path / "c.npz"))


def test_wrong_declaration_that_inference_cannot_see_is_repaired_from_a_run(tmp_path):
    """x ─► MatMul ─► h ─► Reshape(h, Compress(Shape(h), Shape(h) > 0)) ─► Softmax ─► y, declared [1, 7, 1].
    The Reshape's target has a data-dependent length, so shape inference knows nothing of y; the run on the
    first calibration sample shows [1, 3], and the declaration is repaired before the final check."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Shape", ["h"], ["s"], name="shape"),
             helper.make_node("Greater", ["s", "zero"], ["keep"], name="positive"),
             helper.make_node("Compress", ["s", "keep"], ["target"], name="compress", axis=0),
             helper.make_node("Reshape", ["h", "target"], ["r"], name="reshape"),
             helper.make_node("Softmax", ["r"], ["y"], name="softmax", axis=-1)]
    g = helper.make_graph(nodes, "hidden", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 7, 1])],
                          [numpy_helper.from_array(rng.normal(size=(4, 3)).astype(np.float32), "w"),
                           numpy_helper.from_array(np.array(0, np.int64), "zero")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    qmodel, out = _compile_ok(tmp_path, model, _vec_calib(tmp_path / "c.npz"))
    assert "but the model returns [1, 3]" in out
    onnx.checker.check_model(qmodel, full_check=True)
    assert len(qmodel.graph.output[0].type.tensor_type.shape.dim) == 2


@pytest.mark.parametrize("act", ["relu6_clip", "clip_from_minus_one", "relu6_clip_opset10"])
def test_conv_output_is_quantized_after_a_relu6_clip(tmp_path, act):
    """x ─► Conv ─► Clip(lo, 6) ─► GlobalAveragePool ─► y.  With lo = 0 (ReLU6) the output quantizer reads the
    Clip's output (range [0, 6]: no code spent on the negatives it throws away) and onnxruntime still runs the
    Conv as QLinearConv; with lo = -1 it reads the Conv's own output.  At opset 10 the bounds are attributes,
    which the version converter turns into Constant nodes: they must still be seen as constants."""
    rng = np.random.default_rng(0)
    lo = -1.0 if act == "clip_from_minus_one" else 0.0
    opset = 10 if act.endswith("opset10") else 13
    clip = helper.make_node("Clip", ["c"], ["r"], name="clip", min=lo, max=6.0) if opset == 10 else \
        helper.make_node("Clip", ["c", "lo", "hi"], ["r"], name="clip")
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]), clip,
             helper.make_node("GlobalAveragePool", ["r"], ["y"], name="gap")]
    g = helper.make_graph(nodes, "relu6", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 1, 1])],
                          [numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w"),
                           numpy_helper.from_array(rng.normal(size=4).astype(np.float32), "b"),
                           *([numpy_helper.from_array(np.array(lo, np.float32), "lo"),
                              numpy_helper.from_array(np.array(6.0, np.float32), "hi")] if opset == 13 else [])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    qmodel, out = _compile_ok(tmp_path, model, calib_npz(tmp_path / "c.npz"))
    quantized = {n.input[0] for n in qmodel.graph.node if n.op_type == "QuantizeLinear"}
    assert ("r" in quantized) == (lo == 0.0) and ("c" in quantized) == (lo != 0.0)
    assert "1/1 layers on integer kernels (QLinearConv×1)" in out
