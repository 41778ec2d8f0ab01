"""Folding CWAC into the requantization parameters preserves the unfused graph's outputs.

Property tests: three fixed tiny models, and random chains of Conv (plain,
grouped, depthwise; with a residual Add or a Concat), ConvTranspose, Gemm
(either weight layout) and MatMul (± bias Add, 2-D or per position) layers,
with one or two graph outputs; random per-channel gains (including
negative and exactly zero) and biases at W8/W4, ort and trt targets.  The
fused graph must have the plain QDQ graph's op histogram and match the
unfused graph (explicit Mul/Add) in float simulation given the same
activation codes (``equivalence.check_fold``), and running free wherever no
code flipped.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_models import conv_net, linear_chains, matmul_add, mlp_with_constants, saved_random_chain

from qwt2_onnx import CompileConfig, QuantConfig, compile_model
from qwt2_onnx.cwac.fold import build_graphs
from qwt2_onnx.cwac.records import Compensation
from qwt2_onnx.equivalence import check_fold


def _random_comps(res, rng, kinds):
    comps = {}
    for lp in res.plan.layers:
        w = next(t for t in res.float_model.graph.initializer if t.name == lp.weight)
        c = w.dims[lp.axis]
        g = rng.uniform(0.5, 1.5, c) * rng.choice([1, -1], c, p=[0.7, 0.3]) if "neg" in kinds else rng.uniform(0.5, 1.5, c)
        if "zero" in kinds:
            g[rng.integers(0, c)] = 0.0
        comps[lp.node] = Compensation(lp.node, g.astype(np.float32), rng.normal(0, 0.3, c).astype(np.float32),
                                      1 if lp.op in ("Conv", "ConvTranspose") else -1, "test", {})
    return comps


def _assert_fold_equal(fused, unfused, x, stats):
    """Fused and unfused agree to 1e-5 given the same activation codes, at the graph outputs and at every
    compensated layer; running free, also at the outputs unless the fold's float rounding moved an activation
    across a rounding tie (a code flip: docs/CWAC.md, "Fused vs unfused")."""
    check = check_fold(fused, unfused, [{"x": x[i:i + 1]} for i in range(len(x))], 2)
    assert check.forced_layers and check.worst_forced <= 1e-5, (stats, check.summary())
    if check.flipped == 0:
        assert max(s.max_rel for s in check.free_outputs.values()) <= 1e-5, (stats, check.summary())


MODELS = {"conv_net": (conv_net, (3, 8, 8)), "mlp": (mlp_with_constants, (4,)), "matmul_add": (matmul_add, (6,))}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(model=st.sampled_from(sorted(MODELS)), target=st.sampled_from(["ort", "trt"]), wbits=st.sampled_from([8, 4]),
       kinds=st.sets(st.sampled_from(["neg", "zero"])), seed=st.integers(0, 2**16))
def test_fold_matches_unfused(tmp_path_factory, model, target, wbits, kinds, seed):
    tmp = tmp_path_factory.mktemp("fold")
    build, shape = MODELS[model]
    onnx.save(build(), tmp / "m.onnx")
    rng = np.random.default_rng(seed)
    calib = [{"x": rng.normal(size=(1, *shape)).astype(np.float32)} for _ in range(8)]
    res = compile_model(tmp / "m.onnx", calib, tmp / "q.onnx", CompileConfig(quant=QuantConfig(target=target, wbits=wbits)),
                        measure=False)
    comps = _random_comps(res, rng, kinds)
    unfused, fused, stats = build_graphs(res.plain_model, comps)
    ops = lambda m: Counter(n.op_type for n in m.graph.node)  # noqa: E731
    if not stats.inserted_ops:
        assert ops(fused) == ops(res.plain_model)
    onnx.checker.check_model(fused, full_check=True)
    _assert_fold_equal(fused, unfused, rng.normal(size=(5, *shape)).astype(np.float32), stats)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chain=linear_chains(), target=st.sampled_from(["ort", "trt"]), wbits=st.sampled_from([8, 4]),
       kinds=st.sets(st.sampled_from(["neg", "zero"])), seed=st.integers(0, 2**16))
def test_fold_matches_unfused_on_random_graphs(tmp_path_factory, chain, target, wbits, kinds, seed):
    """Random layer chains: every Conv / ConvTranspose / Gemm / MatMul is quantized and compensated with random
    gains, folded with the plain graph's op histogram, and the fused graph computes what the unfused one does."""
    tmp = tmp_path_factory.mktemp("fold_random")
    calib, rng, channels = saved_random_chain(chain, seed, tmp / "m.onnx", 8)
    res = compile_model(tmp / "m.onnx", calib, tmp / "q.onnx",
                        CompileConfig(quant=QuantConfig(target=target, wbits=wbits)), measure=False)
    assert res.plan.layers and not res.plan.skipped, res.plan.skipped  # (simplification may merge MatMul + Add)
    comps = _random_comps(res, rng, kinds)
    unfused, fused, stats = build_graphs(res.plain_model, comps)
    assert not stats.skipped and not stats.inserted_ops, stats
    ops = lambda m: Counter(n.op_type for n in m.graph.node)  # noqa: E731
    assert ops(fused) == ops(res.plain_model)
    onnx.checker.check_model(fused, full_check=True)
    _assert_fold_equal(fused, unfused, rng.normal(size=(5, channels, 6, 6)).astype(np.float32), stats)
