"""Bad models, bad data, big models (docs/ROBUSTNESS.md has the table these tests follow).

Every failing row: a QwtError printed without a traceback, exit code 2, the input
file byte-identical, no output, no temporary file left in the output directory or
in TMPDIR.  Every working row: a model that loads and runs.
"""
from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from qwt2_onnx import CompileConfig, compile_model
from qwt2_onnx.cli import main
from qwt2_onnx.runtime import make_session
from tiny_models import calib_npz, conv_net, matmul_add, mlp_with_constants


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree(*dirs: Path) -> set[str]:
    return {str(p) for d in dirs for p in d.rglob("*")}


def compile_fails_cleanly(workdir: Path, model: Path, *args, message: str, exit_code: int = 2) -> str:
    """Run ``compile MODEL ARGS``; check the clean-failure contract; return the output."""
    before_tree = _tree(workdir)
    before = _digest(model) if model.is_file() else None
    res = CliRunner().invoke(main, ["compile", str(model), *map(str, args)], catch_exceptions=True)
    out = res.output
    assert res.exit_code == exit_code, out
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in out
    assert message in out, out
    assert "Fix:" in out, "every error says how to fix it"
    if before is not None:
        assert _digest(model) == before, "the input model was modified"
    assert _tree(workdir) == before_tree, f"left behind: {_tree(workdir) - before_tree}"
    return out


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, path)
    return path


# --- not a file / not ONNX / truncated or corrupted ------------------------------------------------------------

def test_not_a_file_not_onnx_truncated_corrupted(workdir):
    calib = calib_npz(workdir / "c.npz")
    good = _save(conv_net(), workdir / "net.onnx").read_bytes()
    (workdir / "text.onnx").write_text("this is not a model\n")
    (workdir / "truncated.onnx").write_bytes(good[: len(good) // 2])
    corrupted = bytearray(good)
    corrupted[4:36] = b"\xff" * 32  # the graph's structure, not weight bytes (random weights are a valid model)
    (workdir / "corrupted.onnx").write_bytes(bytes(corrupted))
    (workdir / "empty.onnx").write_bytes(b"")
    (workdir / "adir.onnx").mkdir()
    for name, message in [("missing.onnx", "model file not found"), ("adir.onnx", "is not a file"),
                          ("text.onnx", "model"), ("truncated.onnx", "model"), ("corrupted.onnx", "model"),
                          ("empty.onnx", "holds no graph nodes")]:
        out = compile_fails_cleanly(workdir, workdir / name, "--calib", calib, "-o", workdir / "o.onnx",
                                    message=message)
        assert name in out or "adir" in out or "missing" in out, out


# --- a model with no quantizable layer: refused ------------------------------------------------------------------

def test_no_quantizable_layer_is_refused(workdir):
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="relu")], "relu_only",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 8, 8])])
    model = _save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), workdir / "relu.onnx")
    compile_fails_cleanly(workdir, model, "--calib", calib_npz(workdir / "c.npz"), "-o", workdir / "o.onnx",
                          message="no layer that can be quantized")


# --- unsupported ops, custom domains, control flow, LSTM/GRU: quantized around -----------------------------------

def _conv_then(op_nodes: list, extra_inits: list, out_shape, opset: int = 13, domains=()) -> onnx.ModelProto:
    """x[N,3,8,8] ─► Conv ─► Relu ─► r ─► <op_nodes: r ─► h> ─► Flatten ─► Gemm ─► y[N,4]"""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r"], name="relu1"),
             *op_nodes,
             helper.make_node("Flatten", ["h"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "wg", "bg"], ["y"], name="gemm", transB=1)]
    inits = [numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(size=4).astype(np.float32), "b1"),
             numpy_helper.from_array(rng.normal(size=(4, int(np.prod(out_shape)))).astype(np.float32) * 0.1, "wg"),
             numpy_helper.from_array(rng.normal(size=4).astype(np.float32), "bg"), *extra_inits]
    g = helper.make_graph(nodes, "around", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset), *domains])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def _branch(name: str, op: str) -> onnx.GraphProto:
    """A subgraph reading the outer-scope tensor ``r`` (what exporters produce)."""
    return helper.make_graph([helper.make_node(op, ["r"], [f"{name}_out"], name=f"{name}_{op}")], name, [],
                             [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, None)])


def _if_model() -> onnx.ModelProto:
    nodes = [helper.make_node("ReduceSum", ["r"], ["s"], name="sum", keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["cond"], name="gt"),
             helper.make_node("If", ["cond"], ["h"], name="branch",
                              then_branch=_branch("then", "Sigmoid"), else_branch=_branch("else", "Tanh"))]
    return _conv_then(nodes, [numpy_helper.from_array(np.zeros((), np.float32), "zero")], (4, 8, 8))


def _loop_model() -> onnx.ModelProto:
    """h = Loop k times: v = Relu(v - 0.1), starting from r; k = 2 + (size of r mod 3) depends on the batch
    size, so simplification cannot unroll it."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"], name="keep_going"),
         helper.make_node("Sub", ["v_in", "step"], ["v_sub"], name="loop_sub"),
         helper.make_node("Relu", ["v_sub"], ["v_out"], name="loop_relu")],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("v_in", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("Size", ["r"], ["size"], name="size"),
             helper.make_node("Mod", ["size", "three"], ["rem"], name="mod"),
             helper.make_node("Add", ["rem", "two"], ["trip"], name="trips"),
             helper.make_node("Loop", ["trip", "", "r"], ["h"], name="loop", body=body)]
    inits = [numpy_helper.from_array(np.array(3, np.int64), "three"),
             numpy_helper.from_array(np.array(2, np.int64), "two"),
             numpy_helper.from_array(np.array(0.1, np.float32), "step")]
    return _conv_then(nodes, inits, (4, 8, 8))


def _lstm_model(op: str = "LSTM") -> onnx.ModelProto:
    """r[N,4,8,8] ─► Reshape [N,4,64] ─► Transpose [64? no: T=4 steps of 64 features] ─► LSTM/GRU ─► h"""
    rng = np.random.default_rng(1)
    hidden, gates = 6, 4 if op == "LSTM" else 3
    nodes = [helper.make_node("Reshape", ["r", "rs"], ["seq_b"], name="to_seq"),      # [N, 4, 64]
             helper.make_node("Transpose", ["seq_b"], ["seq"], name="time_major", perm=[1, 0, 2]),  # [4, N, 64]
             helper.make_node(op, ["seq", "W", "R", "B"], ["Y"], name="rnn", hidden_size=hidden),  # [4,1,N,6]
             helper.make_node("Transpose", ["Y", ], ["Yt"], name="batch_major", perm=[2, 0, 1, 3]),
             helper.make_node("Identity", ["Yt"], ["h"], name="rnn_out")]
    inits = [numpy_helper.from_array(np.array([0, 4, 64], np.int64), "rs"),
             numpy_helper.from_array(rng.normal(size=(1, gates * hidden, 64)).astype(np.float32) * 0.1, "W"),
             numpy_helper.from_array(rng.normal(size=(1, gates * hidden, hidden)).astype(np.float32) * 0.1, "R"),
             numpy_helper.from_array(rng.normal(size=(1, 2 * gates * hidden)).astype(np.float32) * 0.1, "B")]
    return _conv_then(nodes, inits, (4, 1, hidden))


def _ms_domain_model() -> onnx.ModelProto:
    """A com.microsoft contrib op (custom domain that onnxruntime implements) between the layers."""
    nodes = [helper.make_node("Gelu", ["r"], ["h"], name="gelu", domain="com.microsoft")]
    return _conv_then(nodes, [], (4, 8, 8), domains=[helper.make_opsetid("com.microsoft", 1)])


@pytest.mark.parametrize("build, left_float", [
    (_if_model, "branch"), (_loop_model, "loop"), (lambda: _lstm_model("LSTM"), "rnn"),
    (lambda: _lstm_model("GRU"), "rnn"), (_ms_domain_model, "gelu")],
    ids=["If", "Loop", "LSTM", "GRU", "com.microsoft"])
def test_quantized_around_unsupported_ops(workdir, build, left_float):
    model = _save(build(), workdir / "m.onnx")
    before = _digest(model)
    res = CliRunner().invoke(main, ["compile", str(model), "--calib", str(calib_npz(workdir / "c.npz")),
                                    "-o", str(workdir / "o.onnx")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert _digest(model) == before
    q = onnx.load(workdir / "o.onnx")
    quantized = {n.input[0].removesuffix("_quantized") for n in q.graph.node if n.op_type == "DequantizeLinear"}
    assert {"w1", "wg"} <= quantized, quantized
    assert left_float in {n.name for n in q.graph.node}, "the unsupported op stays, in float"
    line = next(line for line in res.output.splitlines() if "left in float" in line)
    assert f"'{left_float}'" in line and "'conv1'" not in line and "'relu1'" not in line, line
    x = np.random.default_rng(5).normal(size=(4, 3, 8, 8)).astype(np.float32)
    ref = make_session(build()).run(None, {"x": x})[0]
    for optimized in (False, True):
        got = make_session(str(workdir / "o.onnx"), optimized=optimized).run(None, {"x": x})[0]
        assert np.corrcoef(ref.ravel(), got.ravel())[0, 1] > 0.98


def test_unknown_custom_domain_op_is_named(workdir):
    nodes = [helper.make_node("Warp", ["r"], ["h"], name="warp", domain="com.example.ops")]
    model = _save(_conv_then(nodes, [], (4, 8, 8), domains=[helper.make_opsetid("com.example.ops", 1)]),
                  workdir / "custom.onnx")
    out = compile_fails_cleanly(workdir, model, "--calib", calib_npz(workdir / "c.npz"), "-o", workdir / "o.onnx",
                                message="com.example.ops")
    assert "Warp" in out


# --- dynamic / symbolic dims, per-sample shapes ------------------------------------------------------------------

def test_symbolic_dims_and_varying_sample_shapes(workdir):
    model = _save(conv_net(batch="batch", hw="side"), workdir / "dyn.onnx")
    rng = np.random.default_rng(0)
    folder = workdir / "calib"
    folder.mkdir()
    for i, s in enumerate((5, 8, 12, 7) * 6):
        np.save(folder / f"{i:03d}.npy", rng.normal(size=(1, 3, s, s)).astype(np.float32))
    res = CliRunner().invoke(main, ["compile", str(model), "--calib", str(folder), "-o", str(workdir / "o.onnx")],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    sess = make_session(str(workdir / "o.onnx"))
    for s in (4, 9, 16):
        assert sess.run(None, {"x": rng.normal(size=(2, 3, s, s)).astype(np.float32)})[0].shape == (2, 5)


# --- calibration data: wrong names, ranks, dtypes, empty, NaN/Inf -- before any heavy work -----------------------

@pytest.mark.parametrize("arrays, message", [
    ({"input": np.zeros((4, 3, 8, 8), np.float32)}, "'x'"),
    ({"x": np.zeros((4, 8, 8), np.float32)}, "rank"),
    ({"x": np.zeros((4, 3, 8, 8), np.int64)}, "int64"),
    ({"x": np.zeros((0, 3, 8, 8), np.float32)}, "empty"),
    ({"x": np.full((4, 3, 8, 8), np.nan, np.float32)}, "sample 0"),
    ({"x": np.concatenate([np.zeros((2, 3, 8, 8)), np.full((1, 3, 8, 8), np.inf)]).astype(np.float32)}, "sample 2"),
], ids=["name", "rank", "dtype", "empty", "nan", "inf"])
def test_bad_calibration_data(workdir, monkeypatch, arrays, message):
    import qwt2_onnx.distributed as distributed
    import qwt2_onnx.pipeline as pipeline

    def heavy(*a, **k):
        raise AssertionError("calibration ran on bad data")

    monkeypatch.setattr(distributed, "collect_ranges", heavy)  # what the calibrate stage calls
    monkeypatch.setattr(pipeline, "NormalizePass", heavy)
    model = _save(conv_net(), workdir / "net.onnx")
    np.savez(workdir / "bad.npz", **arrays)
    compile_fails_cleanly(workdir, model, "--calib", workdir / "bad.npz", "-o", workdir / "o.onnx", message=message)


# --- output path = input, directory missing or read-only, disk full --------------------------------------------

def test_output_is_input(workdir):
    model = _save(conv_net(), workdir / "net.onnx")
    compile_fails_cleanly(workdir, model, "--calib", calib_npz(workdir / "c.npz"), "-o", model,
                          message="would overwrite the input model")


def test_output_directory_missing(workdir):
    model = _save(conv_net(), workdir / "net.onnx")
    compile_fails_cleanly(workdir, model, "--calib", calib_npz(workdir / "c.npz"), "-o", workdir / "no" / "o.onnx",
                          message="output directory does not exist")


def test_output_directory_read_only(workdir, monkeypatch):
    model = _save(conv_net(), workdir / "net.onnx")
    calib = calib_npz(workdir / "c.npz")
    ro = workdir / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: make the kernel's answer for this directory the non-root one
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == ro and mode & os.W_OK
                            else real_access(p, mode, **k))
    try:
        compile_fails_cleanly(workdir, model, "--calib", calib, "-o", ro / "o.onnx", message="not writable")
    finally:
        ro.chmod(0o755)


def test_disk_full_during_write_leaves_nothing(workdir, monkeypatch):
    """ENOSPC from the file system half way through writing the model: no output, no temp file, input intact."""
    import builtins

    model = _save(conv_net(), workdir / "net.onnx")
    calib = calib_npz(workdir / "c.npz")
    real_open = builtins.open

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fake_open(file, mode="r", *a, **k):
        f = real_open(file, mode, *a, **k)
        staged_model = ".qwt2-staging-" in str(file) and Path(file).name == "o.onnx"
        return FullDisk(f) if "w" in mode and staged_model else f

    monkeypatch.setattr(builtins, "open", fake_open)
    out = compile_fails_cleanly(workdir, model, "--calib", calib, "-o", workdir / "o.onnx",
                                message="No space left on device")
    assert "o.onnx" in out


# --- big models: external data in, external data out -------------------------------------------------------------

def _wide_calib(path: Path) -> Path:
    return calib_npz(path, shape=(64,))


def test_external_data_in_gives_external_data_out(workdir):
    m = matmul_add(64, 32)  # a 64x32 int8 weight: over the 1 KiB under which tensors stay inline
    onnx.save(m, workdir / "ext.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="ext.weights", size_threshold=0)
    before = _digest(workdir / "ext.onnx"), _digest(workdir / "ext.weights")
    res = CliRunner().invoke(main, ["compile", str(workdir / "ext.onnx"), "--calib", str(_wide_calib(workdir / "c.npz")),
                                    "-o", str(workdir / "o.onnx")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert (_digest(workdir / "ext.onnx"), _digest(workdir / "ext.weights")) == before
    assert (workdir / "o.onnx.data").is_file(), sorted(p.name for p in workdir.iterdir())
    q = onnx.load(workdir / "o.onnx", load_external_data=False)
    assert any(t.data_location == TensorProto.EXTERNAL for t in q.graph.initializer)
    x = np.random.default_rng(0).normal(size=(2, 64)).astype(np.float32)
    assert make_session(str(workdir / "o.onnx")).run(None, {"x": x})[0].shape == (2, 32)
    assert not [p for p in workdir.rglob(".qwt2-*")]


def test_size_threshold_switches_to_external_data(workdir):
    """The 2 GB rule with the threshold lowered: a small model crosses it and is written with external data."""
    model = _save(matmul_add(64, 32), workdir / "m.onnx")
    res = CliRunner().invoke(main, ["compile", str(model), "--calib", str(_wide_calib(workdir / "c.npz")),
                                    "-o", str(workdir / "o.onnx"), "--external-data-above", "1000"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert (workdir / "o.onnx.data").stat().st_size >= 64 * 32
    assert (workdir / "o.onnx").stat().st_size < (workdir / "m.onnx").stat().st_size / 2
    sess = make_session(str(workdir / "o.onnx"))
    assert sess.run(None, {"x": np.zeros((1, 64), np.float32)})[0].shape == (1, 32)


def test_large_model_runs_from_a_file(workdir, monkeypatch):
    """Models over protobuf's limit cannot be handed to onnxruntime as bytes: with the limit lowered, a small
    model takes that path (external data in a temporary folder) through the whole compile."""
    import qwt2_onnx.model_io as model_io

    import contextlib

    import qwt2_onnx.runtime as runtime

    monkeypatch.setattr(model_io, "PROTOBUF_LIMIT", 1500)  # the float model is 8 KB, the int8 one 2-3 KB
    from_files = []

    @contextlib.contextmanager
    def spy(model):
        with model_io.runnable(model) as src:
            from_files.append(isinstance(src, str))
            yield src

    monkeypatch.setattr(runtime, "runnable", spy)
    model = _save(matmul_add(64, 32), workdir / "m.onnx")
    res = compile_model(model, _wide_calib(workdir / "c.npz"), workdir / "o.onnx")
    assert from_files and all(from_files), "every session was made from a file"
    assert res.fidelity.deployed["y"].sqnr_db > 20
    assert (workdir / "o.onnx.data").is_file()
    assert not list((workdir / "tmpdir").iterdir()), "temporary external data removed"


# --- already-quantized input -----------------------------------------------------------------------------------

def test_already_quantized_qdq_and_qoperator(workdir):
    from onnxruntime.quantization import QuantFormat, quantize_static

    from qwt2_onnx.calib_data import open_calibration, InputSpec

    fmodel = _save(conv_net(), workdir / "net.onnx")
    calib = calib_npz(workdir / "c.npz")

    class Reader:
        def __init__(self):
            self.it = iter(open_calibration(calib, InputSpec.from_model(onnx.load(fmodel))))

        def get_next(self):
            return next(self.it, None)

    for fmt, message, fix in [(QuantFormat.QDQ, "QDQ form", "--float-model"),
                              (QuantFormat.QOperator, "QOperator form", "pass the float model")]:
        q = workdir / f"q_{fmt.name}.onnx"
        quantize_static(str(fmodel), str(q), Reader(), quant_format=fmt, per_channel=True)
        out = compile_fails_cleanly(workdir, q, "--calib", calib, "-o", workdir / "o.onnx",
                                    message="already quantized")
        assert message in out and fix in out


# --- Ctrl-C ------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_interrupt_leaves_no_partial_output(workdir):
    """SIGINT while the compile runs: exit 130, 'interrupted' on stderr, no output file, no temporary files."""
    model = _save(conv_net(), workdir / "net.onnx")
    rng = np.random.default_rng(0)
    np.savez(workdir / "big.npz", x=rng.normal(size=(20000, 3, 8, 8)).astype(np.float32))
    before_tree = _tree(workdir)
    env = dict(os.environ, TMPDIR=str(workdir / "tmpdir"), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "qwt2_onnx.entry", "-v", "compile", str(model), "--calib",
                             str(workdir / "big.npz"), "-o", str(workdir / "o.onnx"), "--batch-size", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    for line in proc.stderr:  # an observed stage marker, not a wall-clock guess: calibration starts after plan
        if "stage plan" in line:
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err, err
    ort_session_id = str(workdir / "tmpdir" / ".ses")  # importing onnxruntime writes this id file to TMPDIR
    assert _tree(workdir) - {ort_session_id} == before_tree, _tree(workdir) - before_tree


# --- determinism -----------------------------------------------------------------------------------------------

def test_same_inputs_same_bytes_and_report(workdir):
    import json

    model = _save(mlp_with_constants(), workdir / "mlp.onnx")
    np.savez(workdir / "c.npz", x=np.random.default_rng(0).normal(size=(48, 4)).astype(np.float32))
    for name in ("a", "b"):
        res = CliRunner().invoke(main, ["compile", str(model), "--calib", str(workdir / "c.npz"),
                                        "-o", str(workdir / f"{name}.onnx")], catch_exceptions=False)
        assert res.exit_code == 0, res.output
    assert (workdir / "a.onnx").read_bytes() == (workdir / "b.onnx").read_bytes()
    a, b = (json.loads((workdir / f"{n}.report.json").read_text()) for n in ("a", "b"))
    assert a.pop("created") != "" and b.pop("created") != ""
    assert a == b
    assert CompileConfig().check
