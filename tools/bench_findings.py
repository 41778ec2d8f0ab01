"""Computed findings for docs/BENCHMARKS.md: missing cells, where CWAC helps, every case onnxruntime beats us.

All derived mechanically from docs/bench_results.json, so they cannot drift from the tables.
"""
from __future__ import annotations

from zoo_ort_baseline import HEADLINE

BITS = ("w8a8", "w4a8")
EXPECTED = [f"{k}-{b}" for b in BITS for k in ("ort-defaults", "ort-best", "ours-plain", "ours-auto",
                                               "ours-global", "ours-local", "ours-prefix")]
NOT_SCORES = {"n_dets", "float_n_dets"}


def missing_cells(res: dict, models: list[str]) -> list[str]:
    out = []
    for model in models:
        e = res["models"].get(model)
        if e is None:
            out.append(f"{model}: nothing (not reached)")
            continue
        v = e.get("variants", {})
        miss = [k for k in EXPECTED if k not in v]
        failed = [k for k in EXPECTED if k in v and "error" in v[k]]
        if "float" not in e:
            miss.insert(0, "float")
        if miss:
            out.append(f"{model}: not run: {', '.join(miss)}")
        if failed:
            out.append(f"{model}: failed: " + "; ".join(f"{k} ({v[k]['error'].strip().splitlines()[-1][:120]})"
                                                        for k in failed))
        if "latency" not in e:
            out.append(f"{model}: latency not measured")
    if not res.get("scaling"):
        out.append("calibration-set scaling: not run")
    return out


def cwac_gains(res: dict) -> list[str]:
    """Gap recovered on the first headline metric and output SQNR gain, CWAC auto vs plain."""
    lines = ["| model | bits | float | plain | CWAC auto | gap recovered | SQNR plain → CWAC (dB, first part) | "
             "target chosen |", "|---|---|---:|---:|---:|---:|---|---|"]
    for model, e in res["models"].items():
        k = HEADLINE[model][0]
        fl = e.get("float", {}).get("metrics", {}).get(k)
        for bits in BITS:
            p, c = e.get("variants", {}).get(f"ours-plain-{bits}"), e.get("variants", {}).get(f"ours-auto-{bits}")
            if not p or not c or "error" in p or "error" in c or fl is None:
                continue
            a, b = p["metrics"][k], c["metrics"][k]
            gap = f"{(b - a) / (fl - a):.0%}" if fl - a > 1e-9 else "– (plain = float)"
            part = next(iter(p["fidelity"]))
            lines.append(f"| {model} | {bits.upper()} | {fl:.4f} | {a:.4f} | {b:.4f} | {gap} | "
                         f"{p['fidelity'][part]['sqnr_db']:.1f} → {c['fidelity'][part]['sqnr_db']:.1f} | "
                         f"{c['cwac']['target']} ({c['cwac']['compensated']}/{c['cwac']['layers']} layers) |")
    return lines


def _lat(e: dict, bits: str, key: str):
    r = e.get("latency", {}).get("bits", {}).get(bits, {}).get("ratios", {}).get(key)
    return r["median"] if r else None


def ort_beats_us(res: dict) -> list[str]:
    """Every metric on which an onnxruntime variant does better than ours CWAC auto (the default compile)
    at the same bit width: task metrics, output SQNR per part, compile time, peak RSS, size, latency."""
    out = []
    for model, e in res["models"].items():
        v = e.get("variants", {})
        for bits in BITS:
            ours = v.get(f"ours-auto-{bits}")
            if not ours or "error" in ours:
                continue
            for which in ("defaults", "best"):
                o = v.get(f"ort-{which}-{bits}")
                if not o or "error" in o:
                    continue
                wins = [f"{k} {o['metrics'][k]:.4f} vs {ours['metrics'][k]:.4f}" for k in ours["metrics"]
                        if k not in NOT_SCORES and k in o["metrics"] and o["metrics"][k] > ours["metrics"][k] + 1e-12]
                wins += [f"{p} SQNR {o['fidelity'][p]['sqnr_db']:.1f} vs {ours['fidelity'][p]['sqnr_db']:.1f} dB"
                         for p in ours["fidelity"] if p in o["fidelity"]
                         and o["fidelity"][p]["sqnr_db"] > ours["fidelity"][p]["sqnr_db"]]
                for key, unit, fmt in (("compile_s", "compile", ".1f"), ("peak_rss_mb", "peak RSS", ".0f"),
                                       ("size_mb", "size", ".2f")):
                    if o[key] < ours[key]:
                        wins.append(f"{unit} {o[key]:{fmt}} vs {ours[key]:{fmt}}")
                lo, lf = _lat(e, bits, f"ort_{which}/float"), _lat(e, bits, "fused/float")
                if lo is not None and lf is not None and lo < lf:
                    wins.append(f"latency/float {lo:.3f} vs {lf:.3f}")
                if wins:
                    note = (" — *not a 4-bit model: no INT4 weight came out* (the Paddle export keeps its weights in "
                            "Constant nodes, which quantize_static without `pre_process` quantizes as 8-bit "
                            "activations; `weight_type` has nothing to act on)"
                            if bits == "w4a8" and "INT4" not in o.get("weight_types", {"INT4": 0}) else "")
                    out.append(f"* {model} {bits.upper()}, onnxruntime {which}{note}: " + "; ".join(wins))
    return out
