"""Fuzzing: random small valid graphs compile with a passing check or fail with QwtError, never anything else;
a byte-mutated model file only ever gives QwtError."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from qwt2_onnx import CompileConfig, QuantConfig, QwtError, compile_model
from qwt2_onnx.config import CwacConfig
from tiny_models import conv_net


def _random_model(draw_ops: list[str], widths: list[int], scale_exp: list[int], residual: list[bool],
                  seed: int) -> onnx.ModelProto:
    """x[N,C,6,6] ─► (Conv ─► [Relu] ─► [+skip])* ─► GAP ─► Flatten ─► (Gemm | MatMul(+Add))* ─► y."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    c, t, conv_done = 3, "x", False
    for i, (op, w, e, res) in enumerate(zip(draw_ops, widths, scale_exp, residual)):
        scale = 10.0 ** e
        if op == "Conv" and not conv_done:
            W = rng.normal(size=(w, c, 3, 3)) * scale
            inits += [numpy_helper.from_array(W.astype(np.float32), f"w{i}"),
                      numpy_helper.from_array(rng.normal(size=w).astype(np.float32), f"b{i}")]
            nodes.append(helper.make_node("Conv", [t, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}", pads=[1] * 4))
            nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}"))
            out = f"r{i}"
            if res and w == c:
                nodes.append(helper.make_node("Add", [out, t], [f"a{i}"], name=f"add{i}"))
                out = f"a{i}"
            t, c = out, w
            continue
        if not conv_done:
            nodes += [helper.make_node("GlobalAveragePool", [t], ["gap"], name="gap"),
                      helper.make_node("Flatten", ["gap"], ["flat"], name="flat")]
            t, conv_done = "flat", True
        W = rng.normal(size=(c, w)) * scale
        inits.append(numpy_helper.from_array(W.astype(np.float32), f"w{i}"))
        if op == "Gemm":
            inits.append(numpy_helper.from_array(rng.normal(size=w).astype(np.float32), f"b{i}"))
            nodes.append(helper.make_node("Gemm", [t, f"w{i}", f"b{i}"], [f"g{i}"], name=f"gemm{i}"))
            out = f"g{i}"
        else:
            nodes.append(helper.make_node("MatMul", [t, f"w{i}"], [f"m{i}"], name=f"mm{i}"))
            out = f"m{i}"
            if res:
                inits.append(numpy_helper.from_array(rng.normal(size=w).astype(np.float32), f"b{i}"))
                nodes.append(helper.make_node("Add", [out, f"b{i}"], [f"mb{i}"], name=f"bias{i}"))
                out = f"mb{i}"
        t, c = out, w
    if not conv_done:
        nodes += [helper.make_node("GlobalAveragePool", [t], ["gap"], name="gap"),
                  helper.make_node("Flatten", ["gap"], ["flat"], name="flat")]
        t = "flat"
    nodes.append(helper.make_node("Identity", [t], ["y"], name="out"))
    g = helper.make_graph(nodes, "fuzz", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m


layer = st.tuples(st.sampled_from(["Conv", "Conv", "Gemm", "MatMul"]), st.sampled_from([3, 4, 8]),
                  st.integers(-4, 3), st.booleans())


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layers=st.lists(layer, min_size=1, max_size=5), seed=st.integers(0, 2**16),
       target=st.sampled_from(["ort", "trt"]), wbits=st.sampled_from([8, 4]))
def test_random_graphs_compile_or_fail_cleanly(tmp_path_factory, layers, seed, target, wbits):
    d = tmp_path_factory.mktemp("fuzz")
    ops, widths, exps, res = (list(v) for v in zip(*layers))
    onnx.save(_random_model(ops, widths, exps, res, seed), d / "m.onnx")
    rng = np.random.default_rng(seed)
    calib = [{"x": rng.normal(size=(1, 3, 6, 6)).astype(np.float32)} for _ in range(12)]
    cfg = CompileConfig(quant=QuantConfig(target=target, wbits=wbits), cwac=CwacConfig(target="global"),
                        holdout_samples=4)
    try:
        res_ = compile_model(d / "m.onnx", calib, d / "q.onnx", cfg, measure=False)
    except QwtError:
        assert not (d / "q.onnx").exists()
        return
    assert res_.report.passed and (d / "q.onnx").exists()


@pytest.mark.parametrize("seed", range(3))
def test_byte_mutated_model_only_gives_qwt_error(tmp_path, seed):
    good = conv_net().SerializeToString()
    rng = np.random.default_rng(seed)
    calib = [{"x": rng.normal(size=(1, 3, 8, 8)).astype(np.float32)} for _ in range(4)]
    unexpected = []
    for trial in range(15):
        data = bytearray(good)
        for _ in range(int(rng.integers(1, 8))):
            data[int(rng.integers(0, len(data)))] = int(rng.integers(0, 256))
        if trial % 5 == 0:
            data = data[: int(rng.integers(1, len(data)))]  # truncated
        path = tmp_path / f"m{trial}.onnx"
        path.write_bytes(bytes(data))
        try:
            compile_model(path, calib, tmp_path / "q.onnx", CompileConfig(holdout_samples=0), measure=False)
        except QwtError:
            pass
        except Exception as e:  # noqa: BLE001  (collect, so one run shows every escape)
            unexpected.append(f"trial {trial}: {type(e).__name__}: {str(e)[:200]}")
        (tmp_path / "q.onnx").unlink(missing_ok=True)
    assert not unexpected, unexpected
