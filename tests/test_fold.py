"""Folding CWAC into the requantization parameters preserves the unfused graph's outputs.

Property test: random tiny Conv/Gemm/MatMul graphs, random per-channel gains
(including negative and exactly zero) and biases; the fused graph must have
the plain QDQ graph's op histogram and match the unfused graph (explicit
Mul/Add) in float simulation.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwt2_onnx import CompileConfig, QuantConfig, compile_model
from qwt2_onnx.cwac import Compensation, build_graphs
from tiny_models import conv_net, matmul_add, mlp_with_constants


def _run(model, x):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, x)


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
    if not stats["inserted_ops"]:
        assert ops(fused) == ops(res.plain_model)
    onnx.checker.check_model(fused, full_check=True)
    x = {"x": rng.normal(size=(5, *shape)).astype(np.float32)}
    for a, b in zip(_run(unfused, x), _run(fused, x)):
        assert np.max(np.abs(a - b)) <= 1e-5 * max(np.max(np.abs(a)), 1e-6), (stats, np.max(np.abs(a - b)))
