"""CWAC fit: the closed form, its guards, the staged protocol run segment by segment
(must equal re-running the whole prefix per stage), the gates, and the compile
artifacts (fused / unfused / --no-cwac)."""
from __future__ import annotations

import dataclasses
import json
from collections import Counter
from importlib import resources
from pathlib import Path

import jsonschema
import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_models import conv_net, linear_chains, masked_token_net, saved_random_chain, sigmoid_head_net

from qwt2_onnx import CompileConfig, QuantConfig, compile_model
from qwt2_onnx.calib_data import CalibrationSet, InputSpec
from qwt2_onnx.config import CwacConfig
from qwt2_onnx.cwac.closed_form import ChannelSums, fit_affine, real_positions
from qwt2_onnx.cwac.fit import staged_fit
from qwt2_onnx.cwac.gate import output_error, output_errors
from qwt2_onnx.cwac.points import score_head_layers
from qwt2_onnx.cwac.reference import prefix_staged_fit
from qwt2_onnx.equivalence import check_fold
from qwt2_onnx.errors import QwtError


def _sums(q, f, axis=-1):
    s = ChannelSums(q.shape[axis], axis)
    s.update(q, f)
    return s


def test_closed_form_matches_least_squares_per_channel():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(500, 3))
    q = f * np.array([0.9, 1.2, -0.5]) + np.array([0.3, -1.0, 2.0]) + rng.normal(0, 0.05, size=(500, 3))
    m = fit_affine(_sums(q.astype(np.float32), f.astype(np.float32)))
    g, beta, stats = m.gain, m.bias, m.stats
    for c in range(3):
        ref_g, ref_b = np.polyfit(q[:, c], f[:, c], 1)  # least squares f ≈ g·q + β
        assert abs(g[c] - ref_g) < 1e-4 and abs(beta[c] - ref_b) < 1e-4
    assert stats["rejected_channels"] == 0 and g[2] < 0


def test_guards_zero_variance_and_absurd_gain():
    rng = np.random.default_rng(1)
    f = rng.normal(size=(200, 3)).astype(np.float32)
    q = f.copy()
    q[:, 0] = 2.0                     # constant channel: g = 1, β = mean(f − q)
    q[:, 1] = f[:, 1] * 1e-3          # would need g ≈ 1000: rejected, left alone
    m = fit_affine(_sums(q, f), max_gain=4.0)
    g, beta, stats = m.gain, m.bias, m.stats
    assert g[0] == 1.0 and abs(beta[0] - np.mean(f[:, 0] - 2.0)) < 1e-5
    assert g[1] == 1.0 and beta[1] == 0.0
    assert stats == {**stats, "zero_variance": 1, "rejected_channels": 1}


def test_lambda_shrinks_gain_toward_one():
    rng = np.random.default_rng(2)
    f = rng.normal(size=(300, 2)).astype(np.float32)
    q = (f * 0.5 + rng.normal(0, 0.3, size=f.shape)).astype(np.float32)
    g0 = fit_affine(_sums(q, f), lam=0.0).gain
    g1 = fit_affine(_sums(q, f), lam=10.0).gain
    assert np.all(np.abs(g1 - 1) < np.abs(g0 - 1))


def test_keep_spread_matches_the_targets_mean_and_variance():
    rng = np.random.default_rng(3)
    f = rng.normal(size=(2000, 2)) * np.array([2.0, 1.0])
    q = f * np.array([0.8, -1.0]) + rng.normal(0, 1.0, size=f.shape)  # noisy; channel 1 anti-correlated
    q, f = q.astype(np.float32), f.astype(np.float32)
    m = fit_affine(_sums(q, f), keep_spread=True)
    g, beta, stats = m.gain, m.bias, m.stats
    y = q * g + beta
    np.testing.assert_allclose(y.mean(0), f.mean(0), atol=1e-4)
    np.testing.assert_allclose(y.std(0), f.std(0), rtol=1e-4)
    g_ls = fit_affine(_sums(q, f)).gain
    assert g[1] < 0 and np.all(np.abs(g) > np.abs(g_ls))  # least squares shrinks, the spread fit does not
    assert stats["fit"] == "keep spread"


def test_keep_spread_keeps_rare_positives_above_the_threshold():
    """A score channel that is background (logit −8) but for 2 % of positions (logit +1), read through
    noise (correlation 0.9): least squares shrinks the distance from the background by the correlation
    squared and loses most positives at σ > 0.5; the spread fit shrinks it by the correlation and keeps
    most of them."""
    rng = np.random.default_rng(4)
    f = np.where(rng.random((20000, 1)) < 0.02, 1.0, -8.0) + rng.normal(0, 0.3, (20000, 1))
    q = 0.7 * f - 1.0 + rng.normal(0, 0.4, f.shape)
    q, f = q.astype(np.float32), f.astype(np.float32)
    above = {}
    for keep in (False, True):
        m = fit_affine(_sums(q, f), keep_spread=keep)
        g, beta = m.gain, m.bias
        above[keep] = int(np.sum(q * g + beta > 0))
    float_above = int(np.sum(f > 0))
    assert above[False] < 0.5 * float_above < above[True] < 1.5 * float_above, (above, float_above)


def test_score_heads_are_the_layers_under_an_output_sigmoid():
    """Through Concat → Reshape → Split: the class conv is a head, the box conv (split off before the
    Sigmoid) and the stem are not; a graph without a Sigmoid output has none."""
    m = sigmoid_head_net()
    feed = {"x": np.random.default_rng(0).normal(size=(2, 3, 8, 8)).astype(np.float32)}
    points = {n.name: n.output[0] for n in m.graph.node if n.op_type == "Conv"}
    assert score_head_layers(m, points, feed) == {"cls_conv"}
    c = conv_net()
    points = {n.name: n.output[0] for n in c.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")}
    assert score_head_layers(c, points, {"x": feed["x"]}) == set()


def test_score_head_fit_is_recorded_and_lsq_turns_it_off(tmp_path):
    onnx.save(sigmoid_head_net(), tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    calib = [{"x": rng.normal(size=(1, 3, 8, 8)).astype(np.float32)} for _ in range(24)]
    fits = {}
    for head_fit in ("spread", "lsq"):
        cfg = CompileConfig(quant=QuantConfig(wbits=4), cwac=CwacConfig(target="global", head_fit=head_fit),
                            holdout_samples=0)
        res = compile_model(tmp_path / "m.onnx", calib, tmp_path / f"{head_fit}.onnx", cfg, measure=False)
        fits[head_fit] = {f.layer: f.fit for f in res.cwac.layers}
    assert fits["spread"] == {"stem": "least squares", "box_conv": "least squares", "cls_conv": "keep spread"}
    assert set(fits["lsq"].values()) == {"least squares"}


def _compiled(tmp_path, wbits=4, n=24, seed=0, model=None):
    onnx.save(model or conv_net(seed=seed), tmp_path / "m.onnx")
    rng = np.random.default_rng(seed)
    calib = [{"x": rng.normal(size=(1, 3, 8, 8)).astype(np.float32)} for _ in range(n)]
    cfg = CompileConfig(quant=QuantConfig(wbits=wbits), cwac=CwacConfig(enabled=False), holdout_samples=0)
    return compile_model(tmp_path / "m.onnx", calib, tmp_path / "q.onnx", cfg, measure=False), calib


@pytest.mark.parametrize("wbits", [4, 8])
def test_segment_cached_fit_equals_whole_prefix_reruns(tmp_path, wbits):
    res, calib = _compiled(tmp_path, wbits=wbits)
    cfg = CwacConfig(target="global")
    data = CalibrationSet(lambda: iter(calib), InputSpec.from_model(res.float_model), "test", len(calib))
    comps, fits = staged_fit(res.float_model, res.plain_model, res.plan, data, "global", cfg, batch_size=4)
    ref = prefix_staged_fit(res.float_model, res.plain_model, res.plan, data, cfg, batch_size=4)
    assert max(f.stage for f in fits) == 4  # conv1 -> conv2 -> gemm -> mm: four stages
    assert set(comps) == set(ref) and ref, (set(comps), set(ref))
    for name, comp in ref.items():
        np.testing.assert_array_equal(comps[name].gain, comp.gain)  # same float32 arithmetic: bit-identical
        np.testing.assert_array_equal(comps[name].bias, comp.bias)


def test_segment_cached_fit_equals_whole_prefix_reruns_with_a_score_head(tmp_path):
    """The score head's spread fit and its held-out gate in score space, both protocols."""
    res, calib = _compiled(tmp_path, wbits=4, model=sigmoid_head_net())
    cfg = CwacConfig(target="global")
    data = CalibrationSet(lambda: iter(calib), InputSpec.from_model(res.float_model), "test", len(calib))
    comps, fits = staged_fit(res.float_model, res.plain_model, res.plan, data, "global", cfg, batch_size=4)
    ref = prefix_staged_fit(res.float_model, res.plain_model, res.plan, data, cfg, batch_size=4)
    assert {f.layer: f.fit for f in fits}["cls_conv"] == "keep spread"
    assert set(comps) == set(ref) and "cls_conv" in ref, (set(comps), set(ref))
    for name, comp in ref.items():
        np.testing.assert_array_equal(comps[name].gain, comp.gain)
        np.testing.assert_array_equal(comps[name].bias, comp.bias)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chain=linear_chains(), seed=st.integers(0, 2**16))
def test_segment_cached_fit_equals_whole_prefix_reruns_on_random_graphs(tmp_path_factory, chain, seed):
    """Random layer chains (grouped / depthwise Conv, ConvTranspose, Gemm in either layout, 2-D and per-position
    MatMul, residual Adds, Concats, a second graph output): the fast staged fit is bit-identical to the slow
    definition, and the compile folds what it fitted with the plain graph's op histogram."""
    tmp = tmp_path_factory.mktemp("fit_random")
    calib, _, _ = saved_random_chain(chain, seed, tmp / "m.onnx", 16)
    res = compile_model(tmp / "m.onnx", calib, tmp / "q.onnx", CompileConfig(quant=QuantConfig(wbits=4),
                        cwac=CwacConfig(enabled=False), holdout_samples=0), measure=False)
    cfg = CwacConfig(target="global")  # the slow definition's target
    data = CalibrationSet(lambda: iter(calib), InputSpec.from_model(res.float_model), "test", len(calib))
    comps, fits = staged_fit(res.float_model, res.plain_model, res.plan, data, "global", cfg, batch_size=4)
    ref = prefix_staged_fit(res.float_model, res.plain_model, res.plan, data, cfg, batch_size=4)
    assert len(fits) == len(res.plan.layers) and set(comps) == set(ref), (set(comps), set(ref))
    for name, comp in ref.items():
        np.testing.assert_array_equal(comps[name].gain, comp.gain)
        np.testing.assert_array_equal(comps[name].bias, comp.bias)
    on = compile_model(tmp / "m.onnx", calib, tmp / "c.onnx", CompileConfig(quant=QuantConfig(wbits=4),
                       holdout_samples=0), measure=False)  # the default: CWAC on, target auto
    ops = lambda m: Counter(n.op_type for n in m.graph.node)  # noqa: E731
    assert ops(on.model) == ops(on.plain_model) and not on.stages.fold.inserted_ops
    assert on.cwac.output_error[on.cwac.target] <= on.cwac.output_error["none"]


def test_fit_is_the_same_with_every_cached_tensor_on_disk(tmp_path, monkeypatch):
    """cache_mib=0 sends every stage-boundary tensor to the temporary folder: same gains, folder removed."""
    import tempfile

    from qwt2_onnx.cwac import segments

    saved = []
    real_save = np.save
    monkeypatch.setattr(segments.np, "save", lambda path, value, **kw: (saved.append(path), real_save(path, value, **kw)))
    res, calib = _compiled(tmp_path, wbits=4)
    data = CalibrationSet(lambda: iter(calib), InputSpec.from_model(res.float_model), "test", len(calib))
    before = set(Path(tempfile.gettempdir()).glob("qwt2_segments_*"))
    memory, _ = staged_fit(res.float_model, res.plain_model, res.plan, data, "global", CwacConfig(target="global"))
    disk, _ = staged_fit(res.float_model, res.plain_model, res.plan, data, "global",
                         CwacConfig(target="global", cache_mib=0))
    assert saved  # the disk tier was used
    assert set(memory) == set(disk) and memory
    for name, comp in memory.items():
        np.testing.assert_array_equal(disk[name].gain, comp.gain)
        np.testing.assert_array_equal(disk[name].bias, comp.bias)
    assert set(Path(tempfile.gettempdir()).glob("qwt2_segments_*")) == before


def test_negative_cache_budget_is_refused():
    with pytest.raises(QwtError, match="negative"):
        CwacConfig(cache_mib=-1)


def test_cwac_never_worse_and_fold_is_exact(tmp_path):
    res, calib = _compiled(tmp_path, wbits=4)
    on = compile_model(tmp_path / "m.onnx", calib, tmp_path / "c.onnx", CompileConfig(quant=QuantConfig(wbits=4)),
                       unfused_path=tmp_path / "u.onnx")
    fit = on.cwac
    assert fit.output_error[fit.target] <= fit.output_error["none"]
    if fit.compensations:  # held-out error really went down, and the simulated SQNR went up
        assert fit.output_error[fit.target] < fit.output_error["none"]
        for name, stats in on.fidelity.simulated.items():
            assert stats.sqnr_db >= on.fidelity.baseline[name].sqnr_db - 0.1
    ops = lambda m: Counter(n.op_type for n in m.graph.node)  # noqa: E731
    assert ops(on.model) == ops(on.plain_model) == ops(res.model)
    unfused = onnx.load(tmp_path / "u.onnx")
    assert ops(unfused)["Mul"] == ops(on.plain_model)["Mul"] + len(fit.compensations)
    report = json.loads((tmp_path / "c.report.json").read_text())
    assert report["passed"] and (tmp_path / "c.report.html").exists()
    assert [r["layer"] for r in report["cwac_layers"]] == [f.layer for f in fit.layers]
    jsonschema.validate(report, json.loads(resources.files("qwt2_onnx").joinpath("data/check_report.schema.json")
                                           .read_text()))
    gate = report["cwac_gate"]  # the model-level choice, with the per-sample account of the held-out part
    assert gate["target"] == fit.target and gate["output_error"].keys() == fit.output_error.keys()
    assert gate["held_out_samples"]["n"] == len(fit.per_sample["none"]) > 0
    assert set(gate["held_out_samples"]["worse_than_none"]) == set(fit.output_error) - {"none"}
    assert "CWAC output gate" in (tmp_path / "c.report.html").read_text()
    assert all(r["fold"] != "–" for r in report["cwac_layers"] if r["layer"] in fit.compensations)
    roles = [c["role"] for c in report["comparisons"]]
    assert roles == ["fold", "free", "deployed", "plain_vs_float", "cwac_vs_float"]
    check = check_fold(on.model, unfused, calib[:6], 2)
    assert check.worst_forced <= 1e-5, check
    assert set(check.forced_layers) == {lp.node for lp in on.plan.layers}


def test_fold_check_catches_a_one_percent_scale_error(tmp_path):
    res, calib = _compiled(tmp_path, wbits=8, n=48)
    on = compile_model(tmp_path / "m.onnx", calib, tmp_path / "c.onnx", CompileConfig(cwac=CwacConfig(target="global")),
                       unfused_path=tmp_path / "u.onnx", measure=False)
    assert on.cwac.compensations, "the tiny model should get some compensation at W8A8"
    layer = next(iter(on.cwac.compensations))
    node = next(n for n in on.model.graph.node if n.name == layer)
    dq = next(n for n in on.model.graph.node if n.output[0] == node.input[1])
    bad = onnx.ModelProto()
    bad.CopyFrom(on.model)
    scale = next(t for t in bad.graph.initializer if t.name == dq.input[1])
    vals = onnx.numpy_helper.to_array(scale).copy()
    vals[0] *= 1.01
    scale.CopyFrom(onnx.numpy_helper.from_array(vals, scale.name))
    unfused = onnx.load(tmp_path / "u.onnx")
    good, broken = check_fold(on.model, unfused, calib[:6], 2), check_fold(bad, unfused, calib[:6], 2)
    assert good.worst_forced <= 1e-5 < 1e-3 < broken.worst_forced


def test_no_cwac_gives_plain_model(tmp_path):
    res, _ = _compiled(tmp_path)
    assert res.cwac is None and "cwac_fit" not in res.seconds
    assert onnx.load(tmp_path / "q.onnx").graph.SerializeToString() == res.plain_model.graph.SerializeToString()


def test_cwac_config_errors():
    from qwt2_onnx import QwtError

    with pytest.raises(QwtError, match="CWAC target"):
        CwacConfig(target="everything")
    with pytest.raises(QwtError, match="held-out"):
        dataclasses.replace(CwacConfig(), holdout_fraction=1.5)
    with pytest.raises(QwtError, match="unknown CWAC head fit .mse."):
        CwacConfig(head_fit="mse")


def test_unfoldable_compensation_is_left_out_of_both_graphs(tmp_path):
    """gemm's dequantized weight also feeds a second reader: its compensation cannot be folded without changing
    what that reader computes, so it is skipped with a reason, and the unfused graph leaves it out too."""
    from onnx import helper

    from qwt2_onnx.cwac.fold import build_graphs
    from qwt2_onnx.cwac.records import Compensation

    res, calib = _compiled(tmp_path, wbits=8)
    m = onnx.ModelProto()
    m.CopyFrom(res.plain_model)
    gemm = next(n for n in m.graph.node if n.name == "gemm")
    m.graph.node.append(helper.make_node("Identity", [gemm.input[1]], ["w_copy"], name="reader"))
    m.graph.output.append(helper.make_tensor_value_info("w_copy", onnx.TensorProto.FLOAT, None))
    comps = {name: Compensation(name, np.full(c, 1.1, np.float32), np.full(c, 0.05, np.float32), -1, "test", {})
             for name, c in (("gemm", 16), ("mm", 5))}
    unfused, fused, stats = build_graphs(m, comps)
    assert stats.strategies["gemm"] == "skipped: shared_weight" and stats.skipped == {"shared_weight": 1}
    assert not stats.strategies["mm"].startswith("skipped")
    muls = [n.name for n in unfused.graph.node if n.op_type == "Mul"]
    assert "mm_cwac_Mul" in muls and "gemm_cwac_Mul" not in muls
    check = check_fold(fused, unfused, calib[:4], 2)
    assert check.worst_forced <= 1e-5


def test_tensor_cache_spills_to_disk_beyond_its_budget():
    from qwt2_onnx.cwac.segments import TensorCache

    with TensorCache(memory_budget=100) as cache:
        small, big = np.arange(10, dtype=np.float32), np.arange(100, dtype=np.float32)
        cache.put(0, "a", small)  # 40 bytes: memory
        cache.put(0, "b", big)  # 400 bytes: disk
        assert len(list(cache.root.iterdir())) == 1  # only b went to disk
        np.testing.assert_array_equal(cache.get(0, "a"), small)
        np.testing.assert_array_equal(cache.get(0, "b"), big)
        cache.drop("b", 1)
        cache.drop("a", 1)
        assert not list(cache.root.iterdir()) and cache._memory_bytes == 0
        root = cache.root
    assert not root.exists()


def _seq_mlp() -> onnx.ModelProto:
    """x[N,T,6] ─► MatMul(W1) ─► Add(b1) ─► Relu ─► MatMul(W2) ─► y: a 3-D MatMul whose following Add the
    policy does not take for its bias (onnxruntime only fuses it on 2-D inputs), as in transformer blocks."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(4)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
             helper.make_node("Add", ["h", "b1"], ["hb"], name="add1"),
             helper.make_node("Relu", ["hb"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "W2"], ["y"], name="mm2")]
    inits = [numpy_helper.from_array(rng.normal(size=(6, 8)).astype(np.float32), "W1"),
             numpy_helper.from_array((rng.normal(size=8) + 3).astype(np.float32), "b1"),
             numpy_helper.from_array(rng.normal(size=(8, 4)).astype(np.float32), "W2")]
    g = helper.make_graph(nodes, "seq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5, 4])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m


def test_fit_target_is_the_float_tensor_at_the_same_point(tmp_path):
    """The float target of a 3-D MatMul is its output, not the following Add's (the plain graph gave it a
    zero bias of its own): the segment-cached fit used to take the Add's output and fit against a target
    shifted by b1, which made it disagree with the prefix reference on PP-OCRv4 rec."""
    import onnx_graphsurgeon as gs

    from qwt2_onnx.cwac.points import float_point

    onnx.save(_seq_mlp(), tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    calib = [{"x": rng.normal(size=(1, 5, 6)).astype(np.float32)} for _ in range(24)]
    cfg = CompileConfig(quant=QuantConfig(wbits=4), cwac=CwacConfig(enabled=False), holdout_samples=0,
                        simplify=False)  # onnxsim would rewrite this MatMul + Add into Reshape-Gemm-Reshape
    res = compile_model(tmp_path / "m.onnx", calib, tmp_path / "q.onnx", cfg, measure=False)
    qnodes = {n.name: n for n in gs.import_onnx(res.plain_model).nodes}
    fnodes = {n.name: n for n in gs.import_onnx(res.float_model).nodes}
    assert float_point(qnodes["mm1"], fnodes) == "h"
    data = CalibrationSet(lambda: iter(calib), InputSpec.from_model(res.float_model), "test", len(calib))
    comps, _ = staged_fit(res.float_model, res.plain_model, res.plan, data, "global", CwacConfig(target="global"))
    ref = prefix_staged_fit(res.float_model, res.plain_model, res.plan, data, CwacConfig(target="global"))
    assert set(comps) == set(ref) and "mm1" in ref
    for name, comp in ref.items():
        np.testing.assert_array_equal(comps[name].gain, comp.gain)  # same float32 arithmetic: bit-identical
        np.testing.assert_array_equal(comps[name].bias, comp.bias)


def _padded_tokens(n: int, seed: int, padding: float):
    """``n`` samples of masked_token_net's inputs: 2-6 real tokens each, the rest padding filled with
    ``padding``-scaled garbage (what an encoder's padded positions hold is not what its real ones do)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        real = int(rng.integers(2, 7))
        mask = (np.arange(6) < real).astype(np.int64)[None]
        x = rng.normal(size=(1, 6, 4)).astype(np.float32)
        x[0, real:] = padding * (3.0 + rng.normal(size=(6 - real, 4)))
        out.append({"x": x, "mask": mask})
    return out


def test_position_mask_keeps_padding_out_of_the_fit_and_the_gate(tmp_path):
    """With --cwac-position-mask, two calibration sets that differ only at padded positions give
    bit-identical compensation and held-out output error; without it they do not.  The slow reference
    protocol masks the same way (bit-identical)."""
    onnx.save(masked_token_net(), tmp_path / "m.onnx")
    quiet, loud = _padded_tokens(24, 3, 0.0), _padded_tokens(24, 3, 5.0)
    for a, b in zip(quiet, loud):
        np.testing.assert_array_equal(a["mask"], b["mask"])
        keep = a["mask"][0] != 0
        np.testing.assert_array_equal(a["x"][0, keep], b["x"][0, keep])
    cfg = CompileConfig(quant=QuantConfig(wbits=4), cwac=CwacConfig(enabled=False), holdout_samples=0)
    res = compile_model(tmp_path / "m.onnx", quiet, tmp_path / "q.onnx", cfg, measure=False)
    spec = InputSpec.from_model(res.float_model)
    sets = [CalibrationSet(lambda d=d: iter(d), spec, "test", len(d)) for d in (quiet, loud)]
    masked, plain = CwacConfig(target="global", position_mask="mask"), CwacConfig(target="global")

    def fit(data, c):
        comps, fits = staged_fit(res.float_model, res.plain_model, res.plan, data, "global", c, batch_size=4)
        return comps, fits

    (ca, fa), (cb, _) = fit(sets[0], masked), fit(sets[1], masked)
    assert set(ca) == set(cb) and "down" in ca, (set(ca), set(cb))
    assert all(f.real_positions_only for f in fa)
    for name in ca:
        np.testing.assert_array_equal(ca[name].gain, cb[name].gain)
        np.testing.assert_array_equal(ca[name].bias, cb[name].bias)
    ref = prefix_staged_fit(res.float_model, res.plain_model, res.plan, sets[1], masked, batch_size=4)
    assert set(ref) == set(cb)
    for name in ref:
        np.testing.assert_array_equal(ref[name].gain, cb[name].gain)
        np.testing.assert_array_equal(ref[name].bias, cb[name].bias)
    ua, ub = fit(sets[0], plain)[0], fit(sets[1], plain)[0]
    assert any(not np.array_equal(ua[n].gain, ub[n].gain) for n in set(ua) & set(ub)) or set(ua) != set(ub)
    errs = {(i, m): output_error(res.float_model, res.plain_model, d, 4, m)
            for i, d in enumerate(sets) for m in ("mask", None)}
    assert errs[(0, "mask")] == errs[(1, "mask")] > 0
    assert errs[(0, None)] != errs[(1, None)]
    shares = [output_errors(res.float_model, res.plain_model, d, 4, "mask").per_sample for d in sets]
    np.testing.assert_array_equal(shares[0], shares[1])  # each sample's share counts its real tokens only
    assert shares[0].sum() == pytest.approx(errs[(0, "mask")], rel=1e-12)
    # the compile report says which layers were fitted on real positions only
    cfg = CompileConfig(quant=QuantConfig(wbits=4), cwac=masked, holdout_samples=0)
    compile_model(tmp_path / "m.onnx", loud, tmp_path / "c.onnx", cfg)
    report = json.loads((tmp_path / "c.report.json").read_text())
    assert {r["layer"]: r["positions"] for r in report["cwac_layers"]} == {"up": "real", "down": "real"}


def test_real_positions_only_touches_channel_last_token_tensors():
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    t = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    axis, (got,) = real_positions(mask, -1, t)
    assert axis == -1 and got.shape == (3, 4)
    np.testing.assert_array_equal(got, t[[0, 0, 1], [0, 1, 0]])
    conv = np.zeros((2, 3, 5), np.float32)  # [batch, channels, length]: channel axis 1 is not last
    assert real_positions(mask, 1, conv)[1][0] is conv
    flat = t.reshape(6, 4)  # [batch·seq, channels]: an exporter's 2-D linear layer
    np.testing.assert_array_equal(real_positions(mask, -1, flat)[1][0], got)
    assert real_positions(mask, -1, np.zeros((2, 3), np.float32))[1][0].shape == (2, 3)  # [batch, seq]: unchanged
    assert real_positions(None, -1, t)[1][0] is t


@pytest.mark.parametrize("name, message", [("nope", "not an input of the model"), ("x", r"not \[batch, seq\]")])
def test_position_mask_must_name_a_rank_2_input(tmp_path, name, message):
    onnx.save(masked_token_net(), tmp_path / "m.onnx")
    cfg = CompileConfig(cwac=CwacConfig(position_mask=name), holdout_samples=0)
    with pytest.raises(QwtError, match=message):
        compile_model(tmp_path / "m.onnx", _padded_tokens(12, 0, 1.0), tmp_path / "q.onnx", cfg)
    assert not (tmp_path / "q.onnx").exists()
