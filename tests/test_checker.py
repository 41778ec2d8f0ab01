"""The equivalence checker and diff: mutations are caught and named, exit codes, reports (JSON schema, HTML
rendered in headless Chromium)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from importlib import resources
from pathlib import Path

import jsonschema
import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from qwt2_onnx import CompileConfig, QuantConfig, compile_model
from qwt2_onnx.cli import main
from qwt2_onnx.config import CalibConfig, CwacConfig
from qwt2_onnx.diffstats import HIST_EDGES, DiffAccumulator, Tolerance, Verdict, histogram_bins
from tiny_models import conv_net

SCHEMA = json.loads(resources.files("qwt2_onnx").joinpath("data/check_report.schema.json").read_text())


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """conv_net compiled at W4A8 with CWAC (global target: every layer compensated), fused + unfused + data."""
    d = tmp_path_factory.mktemp("checker")
    onnx.save(conv_net(seed=5), d / "m.onnx")
    rng = np.random.default_rng(5)
    x = rng.normal(size=(24, 3, 8, 8)).astype(np.float32)
    np.savez(d / "data.npz", x=x)
    res = compile_model(d / "m.onnx", d / "data.npz", d / "fused.onnx",
                        CompileConfig(quant=QuantConfig(wbits=4), cwac=CwacConfig(target="global"), holdout_samples=8),
                        unfused_path=d / "unfused.onnx")
    assert len(res.cwac.compensations) >= 2, res.cwac.layers
    return d, res


def _check(d: Path, fused: Path, *extra: str):
    return CliRunner().invoke(main, ["check", str(fused), str(d / "unfused.onnx"), "--data", str(d / "data.npz"),
                                     "--report", str(d / "rep"), *extra])


def _mutated(d: Path, res, layer: str, how: str) -> Path:
    """The fused model with one layer's fold broken: 1 % on one channel's scale, the bias fold dropped, or one
    channel's integer row negated."""
    m = onnx.load(d / "fused.onnx")
    inits = {t.name: t for t in m.graph.initializer}
    node = next(n for n in m.graph.node if n.name == layer)
    producer = {o: n for n in m.graph.node for o in n.output}
    wdq = producer[node.input[1]]
    if how == "scale":
        t = inits[wdq.input[1]]
        v = onnx.numpy_helper.to_array(t).copy()
        v[0] *= 1.01
    elif how == "sign":
        t = inits[wdq.input[0]]
        v = onnx.numpy_helper.to_array(t).copy()
        v[0] = -v[0]
    else:  # "bias": back to the plain model's int32 bias (the fold of β dropped, the gain kept in the scale)
        bdq = producer[node.input[2]]
        t = inits[bdq.input[0]]
        plain = {i.name: i for i in res.plain_model.graph.initializer}
        v = onnx.numpy_helper.to_array(plain[t.name]).copy()
    t.CopyFrom(onnx.numpy_helper.from_array(v, t.name))
    out = d / f"mut_{how}.onnx"
    onnx.save(m, out)
    return out


def test_check_passes_on_the_compiled_pair(compiled):
    d, _ = compiled
    r = _check(d, d / "fused.onnx")
    assert r.exit_code == 0, r.output
    assert "PASSED | output 'y'" in r.output
    report = json.loads((d / "rep" / "report.json").read_text())
    jsonschema.validate(report, SCHEMA)
    assert report["passed"] and report["data"]["samples"] == 24 and len(report["data"]["sha256"]) == 64


@pytest.mark.parametrize("how", ["scale", "bias", "sign"])
def test_mutations_fail_and_name_the_layer(compiled, how):
    d, res = compiled
    layer = "conv1" if how != "bias" else "conv2"
    r = _check(d, _mutated(d, res, layer, how))
    assert r.exit_code == 1, r.output
    report = json.loads((d / "rep" / "report.json").read_text())
    jsonschema.validate(report, SCHEMA)
    failed = [v for v in report["verdicts"] if not v["passed"]]
    assert failed and not report["passed"]
    worst = max((v for v in failed if v["kind"] == "layer"), key=lambda v: v["value"] / max(v["threshold"], 1e-30))
    assert worst["name"] == layer, failed
    assert f"FAILED | layer '{layer}'" in r.output


def test_usage_errors_exit_2(compiled, tmp_path):
    d, _ = compiled
    r = CliRunner().invoke(main, ["check", str(d / "fused.onnx"), str(d / "unfused.onnx")])
    assert r.exit_code == 2 and "--data" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["check", str(tmp_path / "nope.onnx"), str(d / "unfused.onnx"), "--random-data", "4"])
    assert r.exit_code == 2 and "not found" in r.output


def test_check_of_unrelated_models_is_a_usage_error(compiled):
    d, _ = compiled
    r = CliRunner().invoke(main, ["check", str(d / "m.onnx"), str(d / "unfused.onnx"), "--data", str(d / "data.npz")])
    assert r.exit_code == 2 and "not a fused/unfused pair" in r.output and "Traceback" not in r.output


def test_diff_float_vs_int8_with_parts_and_tolerances(compiled):
    d, _ = compiled
    args = ["diff", str(d / "m.onnx"), str(d / "fused.onnx"), "--data", str(d / "data.npz"), "--report", str(d / "df"),
            "--output-part", "first=y:axis=1:0:2"]
    loose = CliRunner().invoke(main, args + ["--rtol", "10"])
    assert loose.exit_code == 0, loose.output
    tight = CliRunner().invoke(main, args + ["--rtol", "1e-9", "--rtol", "first=10"])
    assert tight.exit_code == 1 and "FAILED | output 'y'" in tight.output and "would pass with" in tight.output
    report = json.loads((d / "df" / "report.json").read_text())
    jsonschema.validate(report, SCHEMA)
    comp = report["comparisons"][0]
    assert set(comp["outputs"]) == {"y", "first"} and set(comp["layers"]) == {"conv1", "conv2", "gemm", "mm"}
    by_name = {v["name"]: v for v in report["verdicts"]}
    assert by_name["first"]["passed"] and not by_name["y"]["passed"]
    bad = CliRunner().invoke(main, args + ["--rtol", "nope=1"])
    assert bad.exit_code == 2 and "unknown output" in bad.output


def test_verdict_minimum_tolerance_would_pass():
    acc = DiffAccumulator("y")
    acc.update(np.array([[1.0, 2.0, 4.0]]), np.array([[1.0, 2.1, 4.0]]))
    s = acc.result()
    assert s.worst_index == [0, 1] and abs(s.max_abs - 0.1) < 1e-12 and s.max_ref == 4.0
    v = Verdict.judge(s, Tolerance(atol=0.01, rtol=0.0))
    assert not v.passed and abs(v.min_atol - 0.1) < 1e-12
    assert Verdict.judge(s, Tolerance(atol=v.min_atol, rtol=0.0)).passed
    assert Verdict.judge(s, Tolerance(atol=0.01, rtol=v.min_rtol)).passed


def test_histogram_bins_equal_a_sorted_search_at_every_edge():
    """The fast |Δ| binning is exact: values on, just below and just above every edge, zeros, tiny,
    huge, inf and NaN land where a binary search over the edges puts them."""
    rng = np.random.default_rng(0)
    edges = np.concatenate([HIST_EDGES, np.nextafter(HIST_EDGES, 0), np.nextafter(HIST_EDGES, np.inf)])
    e = np.concatenate([edges, 10.0 ** rng.uniform(-14, 8, 20000), np.zeros(7),
                        [5e-324, 1e-13, 1e7, 1e300, np.inf, np.nan, np.nan]])
    want = np.bincount(np.searchsorted(HIST_EDGES, e, side="right"), minlength=len(HIST_EDGES) + 1)
    got = histogram_bins(e)
    assert got.sum() == e.size and got[0] >= 10 and got[-1] >= 5  # zeros and tiny; 1e7, 1e300, inf, NaN
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16])
def test_code_distance_and_tie_fraction_equal_the_int32_and_mod_forms(dtype):
    """The check's code comparisons take faster forms: |a − b| in int16 (8-bit codes) and y − floor(y) for
    np.mod(y, 1.0).  Both must give what the plain forms give, bit for bit, at the type's extremes too."""
    from qwt2_onnx.equivalence import code_distance

    rng = np.random.default_rng(0)
    info = np.iinfo(dtype)
    a = rng.integers(info.min, info.max, 50_000, endpoint=True).astype(dtype)
    b = np.where(rng.random(50_000) < 0.9, a, rng.integers(info.min, info.max, 50_000, endpoint=True)).astype(dtype)
    a[:2], b[:2] = [info.max, info.min], [info.min, info.max]
    ref = np.abs(a.astype(np.int64) - b.astype(np.int64))
    got = code_distance(a, b)
    assert np.array_equal(got, ref) and got.max() == int(info.max) - int(info.min)
    y = np.concatenate([rng.standard_normal(100_000) * 300, [-0.0, 0.0, -1.0, 2.0, -1e-20, 1e-20, -3.5, 3.5],
                        rng.integers(-1000, 1000, 1000) + 0.5])
    assert np.array_equal(np.mod(y, 1.0).view(np.int64), (y - np.floor(y)).view(np.int64))


def test_compile_report_is_deterministic_but_for_its_timestamp(compiled, tmp_path):
    d, _ = compiled
    cfg = CompileConfig(quant=QuantConfig(wbits=4), cwac=CwacConfig(target="global"), holdout_samples=8)
    for name in ("a", "b"):
        compile_model(d / "m.onnx", d / "data.npz", tmp_path / f"{name}.onnx", cfg, measure=False)
    a, b = (json.loads((tmp_path / f"{n}.report.json").read_text()) for n in ("a", "b"))
    a.pop("created"), b.pop("created")
    assert a == b
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_compile_checks_do_not_depend_on_the_batch_size(compiled, tmp_path):
    """The checks, the report and the fidelity summary run one sample per call (``verify``), like the fit:
    ``--batch-size`` is a memory knob, and no number a pipeline gates on moves with it."""
    d, _ = compiled
    results = {}
    for bs in (1, 8):
        cfg = CompileConfig(quant=QuantConfig(wbits=4), cwac=CwacConfig(target="global"), holdout_samples=8,
                            calib=CalibConfig(batch_size=bs))
        results[bs] = compile_model(d / "m.onnx", d / "data.npz", tmp_path / f"b{bs}.onnx", cfg)
    a, b = (json.loads((tmp_path / f"b{bs}.report.json").read_text()) for bs in (1, 8))
    a.pop("created"), b.pop("created")
    assert a == b and a["comparisons"]
    assert (tmp_path / "b1.onnx").read_bytes() == (tmp_path / "b8.onnx").read_bytes()
    f1, f8 = results[1].fidelity, results[8].fidelity
    assert f1 == f8 and f1.samples == 8 and f1.baseline is not None


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_html_report_renders_charts_in_headless_chromium(compiled, tmp_path):
    """Screenshot the compile report in headless Chromium and look for the chart colours in the pixels."""
    from PIL import Image

    browser = _chromium()
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (tools/test.sh installs Debian's chromium)")
        pytest.skip("chromium not installed")
    d, _ = compiled
    html_path = d / "fused.report.html"
    text = html_path.read_text()
    assert text.count("<svg") >= 3 and 'class="bar"' in text
    png = tmp_path / "shot.png"
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--hide-scrollbars", "--window-size=1100,1400",
           f"--screenshot={png}", html_path.as_uri()]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    img = np.asarray(Image.open(png).convert("RGB")).astype(int)
    def near(rgb):  # noqa: E306
        return int(np.sum(np.all(np.abs(img - np.array(rgb)) <= 8, axis=-1)))
    assert near((0x1f, 0x77, 0xb4)) > 500, "CWAC bars (blue) not rendered"
    assert near((0xd6, 0x27, 0x28)) > 500, "plain PTQ bars (red) not rendered"


def test_compile_with_a_broken_fold_exits_1_keeps_the_report_and_writes_no_model(compiled, tmp_path, monkeypatch):
    import qwt2_onnx.pipeline as pipeline

    d, _ = compiled
    real = pipeline.build_graphs

    def broken(plain, comps, int32_bias=True, float_bias=frozenset()):
        unfused, fused, stats = real(plain, comps, int32_bias, float_bias)
        node = next(n for n in fused.graph.node if n.name == "conv2")
        wdq = next(n for n in fused.graph.node if n.output[0] == node.input[1])
        t = next(t for t in fused.graph.initializer if t.name == wdq.input[1])
        v = onnx.numpy_helper.to_array(t).copy()
        v[0] *= 1.01
        t.CopyFrom(onnx.numpy_helper.from_array(v, t.name))
        return unfused, fused, stats

    monkeypatch.setattr(pipeline, "build_graphs", broken)
    r = CliRunner().invoke(main, ["compile", str(d / "m.onnx"), "--calib", str(d / "data.npz"), "-o",
                                  str(tmp_path / "out.onnx"), "--wbits", "4", "--cwac-target", "global"])
    assert r.exit_code == 1, r.output
    assert "FAILED | layer 'conv2'" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "out.onnx").exists()
    report = json.loads((tmp_path / "out.report.json").read_text())
    assert not report["passed"] and (tmp_path / "out.report.html").exists()
