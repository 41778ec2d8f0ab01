"""Smoke test of the benchmark pipeline: ``tools/bench --quick`` on ppocr_cls into a temporary directory.

It checks that every variant, the latency comparison and the scaling rows come out with finite numbers and
that the markdown has their rows; not the timings.  Skipped only when the zoo model cannot be fetched.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import fetch_or_skip

pytestmark = [pytest.mark.slow, pytest.mark.zoo]
ROOT = Path(__file__).resolve().parents[1]
VARIANTS = [f"{k}-{b}" for b in ("w8a8", "w4a8") for k in
            ("ort-defaults", "ort-best", "ours-plain", "ours-auto", "ours-global", "ours-local", "ours-prefix")]


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    fetch_or_skip("ppocr_cls")
    out = tmp_path_factory.mktemp("bench")
    p = subprocess.run([str(ROOT / "tools" / "bench"), "--quick", "--out-dir", str(out), "--scaling-n", "4"],
                       capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return out, json.loads((out / "bench_results.json").read_text())


def test_every_variant_has_finite_numbers(quick_run):
    _, res = quick_run
    e = res["models"]["ppocr_cls"]
    assert _finite(e["float"]["metrics"]["acc"])
    for vid in VARIANTS:
        r = e["variants"][vid]
        assert "error" not in r, (vid, r.get("error"))
        assert all(_finite(r[k]) for k in ("compile_s", "peak_rss_mb", "size_mb")), vid
        assert 50 < r["peak_rss_mb"] < 8000, (vid, r["peak_rss_mb"])   # the child's own peak, not the parent's
        assert all(_finite(v) for v in r["metrics"].values()), vid
        assert all(_finite(s["sqnr_db"]) and _finite(s["cosine"]) for s in r["fidelity"].values()), vid
        if vid.startswith("ours-") and "plain" not in vid:
            assert r["cwac"]["target"] in ("global", "local", "none"), vid


def test_latency_and_op_histograms(quick_run):
    _, res = quick_run
    lat = res["models"]["ppocr_cls"]["latency"]
    assert lat["iterations"] >= 15
    for bits in ("w8a8", "w4a8"):
        b = lat["bits"][bits]
        for key in ("fused/plain", "plain_aa/plain", "fused/unfused", "fused/float", "ort_best/float"):
            assert _finite(b["ratios"][key]["median"]) and b["ratios"][key]["median"] > 0, (bits, key)
        h = b["histograms"]
        assert h["fused"]["saved"] == h["plain"]["saved"]           # the fold adds no op
        assert h["unfused"]["saved"] != h["fused"]["saved"] or res["models"]["ppocr_cls"]["variants"][
            f"ours-auto-{bits}"]["cwac"]["compensated"] == 0


def test_markdown_rows_and_plots(quick_run):
    out, res = quick_run
    md = (out / "BENCHMARKS.md").read_text()
    for row in ("| ppocr_cls (acc) |", "| ppocr_cls | W8A8 |", "| ppocr_cls | W4A8 |",
                "ours CWAC global (prefix reference) W4A8", "onnxruntime best config W8A8", "## Missing cells"):
        assert row in md, row
    assert "Quick smoke run" in md
    scaling = res["scaling"]["ppocr_cls"]
    assert {r["variant"] for r in scaling.values()} == {"ours-auto-w8a8", "ours-plain-w8a8", "ort-defaults-w8a8"}
    assert all(_finite(r["compile_s"]) and _finite(r["peak_rss_mb"]) for r in scaling.values())
    for svg in ("bench_scaling_time.svg", "bench_scaling_rss.svg", "bench_compile_vs_size.svg"):
        assert (out / svg).read_text().startswith("<svg")


def test_missing_cells_are_listed(quick_run, tmp_path):
    out, res = quick_run
    del res["models"]["ppocr_cls"]["variants"]["ours-prefix-w4a8"]
    (tmp_path / "bench_results.json").write_text(json.dumps(res))
    sys.path.insert(0, str(ROOT / "tools"))
    from bench_render import render

    md = render(res, tmp_path)
    assert "ppocr_cls: not run: ours-prefix-w4a8" in md
