"""docs/BENCHMARKS.md and its SVG plots from docs/bench_results.json (tools/bench.py writes the JSON).

Dumb on purpose: every number printed comes from the JSON; a cell the run did not produce prints "–" and
is listed under "Missing cells".  The hand-written reading between ``<!-- reading:begin -->`` and
``<!-- reading:end -->`` in an existing BENCHMARKS.md is kept across regenerations.
"""
from __future__ import annotations

import math
from pathlib import Path

from bench_svg import line_plot
from zoo_ort_baseline import HEADLINE

BITS = ("w8a8", "w4a8")
OURS = ("plain", "auto", "global", "local", "prefix")
VARIANT_LABEL = {"ort-defaults": "onnxruntime `quantize_static` defaults", "ort-best": "onnxruntime best config",
                 "ours-plain": "ours `--no-cwac`", "ours-auto": "ours CWAC auto (default)",
                 "ours-global": "ours CWAC global (segment-cached)", "ours-local": "ours CWAC local (segment-cached)",
                 "ours-prefix": "ours CWAC global (prefix reference)"}
NOT_BETTER = {"n_dets", "float_n_dets"}   # counts, not scores: more is not better
BEGIN, END = "<!-- reading:begin -->", "<!-- reading:end -->"


def f(x, fmt=".3f", dash="–") -> str:
    return dash if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def headline(model: str, metrics: dict | None) -> str:
    if not metrics:
        return "–"
    return " / ".join(f(metrics.get(k)) for k in HEADLINE[model])


def header(res: dict) -> list[str]:
    m = res.get("meta", {})
    isa = m.get("isa", [])
    vnni = [x for x in isa if "vnni" in x]
    return [
        "# Benchmarks: float vs onnxruntime `quantize_static` vs qwt2-onnx", "",
        "Regenerate: `tools/bench` (resumes from `docs/bench_results.json`; `tools/bench --render-only` "
        "re-renders this file and the plots from it).  Smoke version: `tools/bench --quick`.  "
        f"This run: `{m.get('command')}`" + (f"; {m['note']}" if m.get("note") else "") + ".", "",
        f"* Machine: {m.get('cpu')} ({m.get('machine')}), {m.get('cores')} cores shared with other jobs "
        f"(load average at start {', '.join(f(x, '.2f') for x in m.get('loadavg_start', []))}).",
        f"* Instruction set (from /proc/cpuinfo): {', '.join(isa) or '?'}.  "
        + (f"**This CPU has {', '.join(vnni)}**, so onnxruntime's u8·s8 kernels use VNNI here "
           "(no 16-bit pair saturation); the 7-bit weight range our `--target ort` uses by default is a "
           "precaution for AVX2-only CPUs that costs some accuracy here." if vnni else
           "No VNNI: u8·s8 is the integer path that pays off; s8·s8 QDQ falls back to slower kernels."),
        f"* Software: Python {m.get('python')}, onnxruntime {m.get('onnxruntime')}, onnx {m.get('onnx')}, "
        f"numpy {m.get('numpy')}; qwt2-onnx at commit {m.get('commit')}.",
        f"* Run: started {m.get('started')}, last invocation ended {m.get('finished', '**not finished**')}"
        + (f"; invocations: {', '.join(f'`{c}`' for c in m['invocations'])}" if m.get("invocations") else "") + ".",
        *(["**Quick smoke run (`--quick`): few samples, one model, a small evaluation set, seconds of latency; "
            "it checks that the pipeline runs, its numbers are not the benchmark.**"] if m.get("quick") else []),
        f"* Data: every variant calibrates on the same {m.get('n_calib')} samples of the task's calibration set "
        "(tools/zoo_tasks.py; CWAC fits on 75% of them and gates on the other 25%); every metric is measured on "
        "the task's separate evaluation set, *deployed*: onnxruntime CPU, all graph optimizations.",
        "* Compile cost: each compile runs in a fresh process (tools/bench_child.py); *compile* = wall seconds of "
        "the `compile_model` / `quantize_static` call, *peak RSS* = the whole process's peak resident set (VmHWM; imports, "
        "model, data included), *size* = the written .onnx.  Ours: `compile_model(model, calib.npz, out, "
        "CompileConfig(quant=QuantConfig(target='ort', wbits=8|4), cwac=CwacConfig(...), holdout_samples=0))`, "
        "i.e. `qwt2-onnx compile MODEL --calib calib.npz [--wbits 4] [--no-cwac | --cwac-target T]` with its "
        "default check and fusion report included.  onnxruntime: `quantize_static` via "
        "`tools/zoo_ort_baseline.py:ort_quantize` with the options in the table below (the calibration "
        "arrays held in memory, as its data reader takes them).", ""]


def ort_options_table(res: dict) -> list[str]:
    lines = ["## onnxruntime configurations (exact options)", "",
             "`quant_format=QDQ, per_channel=True` always; *best* = the winner of the sweep in "
             "`tools/zoo_ort_baseline.py --sweep` (`tools/ort_best_configs.json`); W4A8 adds "
             "`weight_type=QInt4` (activations stay uint8).  `pre_process` = onnxruntime's `quant_pre_process` "
             "first.", "", "| model | defaults | best (W8A8) | best (W4A8) |", "|---|---|---|---|"]
    for model, e in res["models"].items():
        v = e.get("variants", {})
        opt = lambda k: f"`{v[k]['options']}`" if k in v and v[k].get("options") else "–"  # noqa: E731
        lines.append(f"| {model} | {opt('ort-defaults-w8a8')} | {opt('ort-best-w8a8')} | {opt('ort-best-w4a8')} |")
    return lines + [""]


def summary_table(res: dict) -> list[str]:
    lines = ["## Task metric (headline)", "",
             "Deployed.  Metric names per model in the first column; `a / b` = the metrics in that order.", ""]
    for bits in BITS:
        lines += [f"### {bits.upper()}", "",
                  "| model (metric) | float | " + " | ".join(VARIANT_LABEL.values()) + " |",
                  "|---|---:|" + "---:|" * len(VARIANT_LABEL)]
        for model, e in res["models"].items():
            v = e.get("variants", {})
            cells = [headline(model, v.get(f"{k}-{bits}", {}).get("metrics")) for k in VARIANT_LABEL]
            lines.append(f"| {model} ({' / '.join(HEADLINE[model])}) | "
                         f"{headline(model, e.get('float', {}).get('metrics'))} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def model_table(model: str, e: dict) -> list[str]:
    v = e.get("variants", {})
    fkeys = list(e.get("float", {}).get("metrics", {}))
    mkeys = [k for k in HEADLINE[model] if k in fkeys] + [k for k in fkeys if k not in HEADLINE[model]]
    parts = sorted({p for r in v.values() for p in r.get("fidelity", {})})
    lines = [f"### {model}", "",
             f"{e['info']['file']}: {e['info']['size_mb']:.1f} MB, {e['info']['params']:,} parameters, "
             f"{e['info']['nodes']} nodes.  SQNR (dB) / cosine vs float per output part on the evaluation set.", "",
             "| variant | " + " | ".join(mkeys) + " | " + " | ".join(f"{p} SQNR / cos" for p in parts)
             + " | compile (s) | peak RSS (MB) | size (MB) | CWAC: target, layers, fit (s) | DQ'd initializers |",
             "|---|" + "---:|" * (len(mkeys) + len(parts) + 3) + "---|---|"]
    fm = e.get("float", {}).get("metrics", {})
    lines.append("| float | " + " | ".join(f(fm.get(k)) for k in mkeys) + " |" + " – |" * len(parts)
                 + f" – | – | {e['info']['size_mb']:.2f} | – | – |")
    for bits in BITS:
        for k, label in VARIANT_LABEL.items():
            r = v.get(f"{k}-{bits}")
            if r is None:
                continue
            if "error" in r:
                lines.append(f"| {label} {bits} | **failed**: {r['error'][-150:]!r} |")
                continue
            fid = r.get("fidelity", {})
            c = r.get("cwac")
            cw = (f"{c['target']}, {c['compensated']}/{c['layers']}, {c['fit_s']:.1f}" if c else "–")
            lines.append(f"| {label} {bits.upper()} | " + " | ".join(f(r["metrics"].get(x)) for x in mkeys) + " | "
                         + " | ".join(f"{f(fid[p]['sqnr_db'], '.1f')} / {f(fid[p]['cosine'], '.4f')}"
                                      if p in fid else "–" for p in parts)
                         + f" | {r['compile_s']:.1f} | {r['peak_rss_mb']:.0f} | {r['size_mb']:.2f} | {cw} | "
                         + (", ".join(f"{k}×{n}" for k, n in sorted(r.get("weight_types", {}).items())) or "–")
                         + " |")
    return lines + [""]


def aa_floor(res: dict) -> float:
    """The largest A/A deviation |median(plain'/plain) - 1| of the run: two sessions of one file differ by it."""
    return max((abs(b["ratios"]["plain_aa/plain"]["median"] - 1) for e in res["models"].values()
                for b in e.get("latency", {}).get("bits", {}).values()), default=0.0)


def within_noise(r: dict, floor: float) -> str:
    """Per model: |fused/plain - 1| <= |A/A - 1| + both interval half-widths; else against the run's A/A floor."""
    fp, aa = r["fused/plain"], r["plain_aa/plain"]
    half = lambda x: (x["ci95"][1] - x["ci95"][0]) / 2  # noqa: E731
    if abs(fp["median"] - 1) <= abs(aa["median"] - 1) + half(fp) + half(aa):
        return "yes"
    return "within the run's A/A floor" if abs(fp["median"] - 1) <= floor else "**no**"


def latency_table(res: dict) -> list[str]:
    lines = ["## Deployed latency (onnxruntime CPU, 1 thread)", "",
             "Paired ratios: per round-robin iteration t(A)/t(B), median over iterations [bootstrap 95% interval "
             "of the median].  *fused* = ours CWAC auto (folded), *unfused* = the same model with explicit "
             "Mul/Add (`--emit-unfused`), *plain* = ours `--no-cwac`, *A/A* = plain against a second session of "
             "the same file (the noise floor).  Float median in ms for scale only (shared machine).  "
             "*ops equal*: op histogram of fused == plain, saved / as onnxruntime deploys it.", "",
             "*fused ≈ plain*: yes = |fused/plain − 1| ≤ |A/A − 1| + the half-widths of both intervals; "
             f"otherwise compared with the largest A/A deviation of the whole run ({aa_floor(res):.1%}: two "
             "sessions of one file differed by that much).  "
             "*fused < unfused*: the interval of fused/unfused lies below 1.", "",
             "| model | bits | iterations | float (ms) | fused/plain | A/A | fused ≈ plain | fused/unfused | "
             "fused < unfused | fused/float | plain/float | unfused/float | ORT defaults/float | ORT best/float | "
             "fused/ORT best | ops equal |",
             "|---|---|---:|---:|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for model, e in res["models"].items():
        lat = e.get("latency")
        if not lat:
            continue
        for bits, b in ((k, lat["bits"][k]) for k in BITS if k in lat["bits"]):
            r = b["ratios"]
            ci = lambda k: f"{r[k]['median']:.3f} [{r[k]['ci95'][0]:.3f}, {r[k]['ci95'][1]:.3f}]"  # noqa: E731
            h = b["histograms"]
            eq = (f"{h['fused']['saved'] == h['plain']['saved']} / "
                  f"{h['fused']['deployed'] == h['plain']['deployed']}")
            lines.append(f"| {model} | {bits.upper()} | {lat['iterations']} | {lat['median_ms']['float']:.2f} | "
                         f"{ci('fused/plain')} | {ci('plain_aa/plain')} | {within_noise(r, aa_floor(res))} | {ci('fused/unfused')} | "
                         f"{r['fused/unfused']['ci95'][1] < 1} | "
                         + " | ".join(f"{r[k]['median']:.3f}" for k in ("fused/float", "plain/float",
                                      "unfused/float", "ort_defaults/float", "ort_best/float", "fused/ort_best"))
                         + f" | {eq} |")
    lines += ["", "What onnxruntime runs (graph after all optimizations), W8A8: integer kernels vs float Conv fed by "
              "DequantizeLinear:", "", "| model | variant | integer kernels | float Conv | DequantizeLinear | "
              "QuantizeLinear |", "|---|---|---|---:|---:|---:|"]
    for model, e in res["models"].items():
        for k in ("ort-defaults", "ort-best", "ours-plain", "ours-auto"):
            d = e.get("variants", {}).get(f"{k}-w8a8", {}).get("deployed_ops")
            if d:
                ints = ", ".join(f"{op}×{n}" for op, n in sorted(d.items()) if op.startswith(("QLinear", "QGemm",
                                                                                              "MatMulInteger")))
                lines.append(f"| {model} | {VARIANT_LABEL[k]} | {ints or 'none'} | {d.get('Conv', 0)} | "
                             f"{d.get('DequantizeLinear', 0)} | {d.get('QuantizeLinear', 0)} |")
    lines += ["", "Deployed op histograms of fused vs unfused, W8A8:", ""]
    for model, e in res["models"].items():
        h = e.get("latency", {}).get("bits", {}).get("w8a8", {}).get("histograms")
        if h:
            diff = {k: (h["fused"]["deployed"].get(k, 0), h["unfused"]["deployed"].get(k, 0))
                    for k in set(h["fused"]["deployed"]) | set(h["unfused"]["deployed"])
                    if h["fused"]["deployed"].get(k, 0) != h["unfused"]["deployed"].get(k, 0)}
            lines.append(f"* {model}: ops that differ (fused, unfused): "
                         + (", ".join(f"{k} {a}→{b}" for k, (a, b) in sorted(diff.items())) or "none"))
    return lines + [""]


def protocol_table(res: dict) -> list[str]:
    lines = ["## CWAC fit protocols: segment-cached (compile's default) vs prefix re-runs (reference)", "",
             "Both: the exact staged protocol, global target, the same per-layer and output-level gates.  "
             "*Δgain*: max |gain difference| over layers both compensated.", "",
             "| model | bits | compile segment / prefix (s) | fit segment / prefix (s) | peak RSS segment / prefix "
             "(MB) | metric segment / prefix | layers compensated segment / prefix / both | max Δgain |",
             "|---|---|---|---|---|---|---|---:|"]
    for model, e in res["models"].items():
        for bits in BITS:
            a, b = e.get("variants", {}).get(f"ours-global-{bits}"), e.get("variants", {}).get(f"ours-prefix-{bits}")
            if not a or not b:
                continue
            if "error" in b:
                lines.append(f"| {model} | {bits.upper()} | prefix failed: {b['error'][-100:]!r} |")
                continue
            p = e.get("protocols", {}).get(bits, {})
            lines.append(
                f"| {model} | {bits.upper()} | {a['compile_s']:.1f} / {b['compile_s']:.1f} | "
                f"{a['cwac']['fit_s']:.1f} / {b['cwac']['fit_s']:.1f} | {a['peak_rss_mb']:.0f} / "
                f"{b['peak_rss_mb']:.0f} | {headline(model, a['metrics'])} / {headline(model, b['metrics'])} | "
                f"{p.get('segment_layers', '–')} / {p.get('prefix_layers', '–')} / {p.get('common_layers', '–')} | "
                f"{f(p.get('max_gain_diff'), '.1e')} |")
    return lines + [""]


def scaling_section(res: dict, out_dir: Path) -> list[str]:
    lines = ["## Scaling", ""]
    for model, sc in res.get("scaling", {}).items():
        rows = sorted((r for r in sc.values() if "error" not in r), key=lambda r: (r["variant"], r["n"]))
        lines += [f"### Compile time and peak memory vs calibration set size ({model}, W8A8)", "",
                  "| variant | samples | compile (s) | peak RSS (MB) | calibrate stage (s) | CWAC fit (s) |",
                  "|---|---:|---:|---:|---:|---:|"]
        for r in rows:
            st = r.get("stage_s", {})
            lines.append(f"| {VARIANT_LABEL[r['variant'].rsplit('-', 1)[0]]} | {r['n']} | {r['compile_s']:.1f} | "
                         f"{r['peak_rss_mb']:.0f} | {f(st.get('calibrate'), '.1f')} | {f(st.get('cwac_fit'), '.1f')} |")
        lines += [f"| failed: {k} | | {r['error'][-120:]!r} | | | |" for k, r in sc.items() if "error" in r]
        series = {}
        for r in rows:
            series.setdefault(VARIANT_LABEL[r["variant"].rsplit("-", 1)[0]].replace("`", ""), []).append(r)
        for key, unit, name in (("compile_s", "compile (s)", "time"), ("peak_rss_mb", "peak RSS (MB)", "rss")):
            svg = line_plot({k: [(r["n"], r[key]) for r in v] for k, v in series.items()},
                            "calibration samples", unit, f"{model}: {unit} vs calibration samples", logx=True)
            (out_dir / f"bench_scaling_{name}.svg").write_text(svg)
        lines += ["", "![compile time vs samples](bench_scaling_time.svg) "
                  "![peak RSS vs samples](bench_scaling_rss.svg)", ""]
    pts = {}
    for model, e in res["models"].items():
        for k in ("ours-plain", "ours-auto", "ort-best"):
            r = e.get("variants", {}).get(f"{k}-w8a8")
            if r and "error" not in r:
                pts.setdefault(VARIANT_LABEL[k].replace("`", ""), []).append(
                    (e["info"]["params"] / 1e6, r["compile_s"], model))
    if pts:
        lines += ["### Compile time vs model size (W8A8, all zoo models)", "",
                  "| model | parameters (M) | nodes | " + " | ".join(pts) + " |", "|---|---:|---:|" + "---:|" * len(pts)]
        for model, e in sorted(res["models"].items(), key=lambda kv: kv[1]["info"]["params"]):
            cells = [next((f(c, ".1f") for p, c, m in v if m == model), "–") for v in pts.values()]
            lines.append(f"| {model} | {e['info']['params'] / 1e6:.2f} | {e['info']['nodes']} | "
                         + " | ".join(cells) + " |")
        svg = line_plot({k: sorted((p, c) for p, c, _ in v) for k, v in pts.items()}, "parameters (millions)",
                        "compile (s)", "compile time vs model size (W8A8)", logx=False, lines=False,
                        labels=[(p, c, m) for p, c, m in next(iter(pts.values()))])
        (out_dir / "bench_compile_vs_size.svg").write_text(svg)
        lines += ["", "![compile time vs model size](bench_compile_vs_size.svg)", ""]
    return lines


def render(res: dict, out_dir: Path) -> str:
    from bench_findings import cwac_gains, missing_cells, ort_beats_us

    md_path = out_dir / "BENCHMARKS.md"
    old = md_path.read_text() if md_path.exists() else ""
    reading = (old[old.index(BEGIN):old.index(END) + len(END)] if BEGIN in old and END in old else
               f"{BEGIN}\n(No reading written yet: the computed findings below are all there is.)\n{END}")
    models = list(dict.fromkeys(list(res["models"]) + (res.get("meta", {}).get("models") or [])))
    miss = missing_cells(res, models)
    lines = header(res)
    lines += ["## Missing cells", ""] + ([f"* {m}" for m in miss] or ["None: every cell of the full run is here."])
    lines += ["", "## Reading", "", reading, ""]
    lines += ["## Where CWAC helps (computed)", "",
              "*gap recovered* = (CWAC − plain) / (float − plain) on the first headline metric, where plain < float.",
              ""] + cwac_gains(res) + [""]
    beats = ort_beats_us(res)
    lines += ["## Every case where onnxruntime's quantize_static beats ours (computed)", "",
              "Ours = the default compile (CWAC auto) at the same bit width; higher task metric / SQNR, lower "
              "compile time / peak RSS / size / latency ratio counts as a win.", ""] + (beats or ["None."]) + [""]
    lines += summary_table(res) + latency_table(res) + protocol_table(res)
    lines += ["## Fidelity and compile cost per model", ""]
    for model, e in res["models"].items():
        lines += model_table(model, e)
    lines += ort_options_table(res) + scaling_section(res, out_dir)
    text = "\n".join(lines).rstrip() + "\n"
    md_path.write_text(text)
    return text
