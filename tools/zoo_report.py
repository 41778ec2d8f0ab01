"""Render docs/zoo_results.json (tools/zoo_eval.py, tools/zoo_upgrade.py) and tools/ort_best_configs.json
(tools/zoo_ort_baseline.py --sweep) into docs/ZOO.md.

    python tools/zoo_report.py [--json docs/zoo_results.json] [--ort tools/ort_best_configs.json] [--out docs/ZOO.md]
"""
from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import onnxruntime

from zoo_tasks import f1

HEADLINE = {"ppocr_rec": ["char_acc_en", "char_acc_zh"], "ppocr_cls": ["acc", "agree_float"],
            "orientation": ["acc"], "ppocr_det": ["gt_recall", "map_iou"], "yolov8n": ["recall", "precision",
                                                                                     "f1", "score_cos"]}
ORDER = ["ours-w8a8-ort-plain", "ours-w8a8-ort", "ours-w8a8-ort-global", "ours-w8a8-ort-local",
         "ours-w8a8-trt-plain", "ours-w8a8-trt",
         "ours-w4a8-ort-plain", "ours-w4a8-ort", "ours-w4a8-ort-global", "ours-w4a8-ort-local",
         "ort-best-w8a8", "upgrade-ort-best-w8a8", "ort-best-w4a8", "upgrade-ort-best-w4a8",
         "ort-defaults-w8a8", "upgrade-ort-defaults-w8a8", "ort-defaults-w4a8", "upgrade-ort-defaults-w4a8",
         "ort-pp_per_tensor-w8a8", "upgrade-ort-pp_per_tensor-w8a8", "ort-pp_per_tensor-w4a8",
         "upgrade-ort-pp_per_tensor-w4a8"]
LABEL = {"ours-w8a8-ort-plain": "ours W8A8 ort, `--no-cwac`", "ours-w8a8-ort": "ours W8A8 ort (CWAC, auto)",
         "ours-w8a8-ort-global": "ours W8A8 ort, CWAC global", "ours-w8a8-ort-local": "ours W8A8 ort, CWAC local",
         "ours-w8a8-trt-plain": "ours W8A8 trt, `--no-cwac`", "ours-w8a8-trt": "ours W8A8 trt (CWAC, auto)",
         "ours-w4a8-ort-plain": "ours W4A8 ort, `--no-cwac`", "ours-w4a8-ort": "ours W4A8 ort (CWAC, auto)",
         "ours-w4a8-ort-global": "ours W4A8 ort, CWAC global", "ours-w4a8-ort-local": "ours W4A8 ort, CWAC local",
         "ort-best-w8a8": "onnxruntime best (W8A8)", "upgrade-ort-best-w8a8": "↳ upgraded with CWAC",
         "ort-best-w4a8": "onnxruntime best, int4 weights", "upgrade-ort-best-w4a8": "↳ upgraded with CWAC",
         "ort-defaults-w8a8": "onnxruntime defaults (W8A8)", "upgrade-ort-defaults-w8a8": "↳ upgraded with CWAC",
         "ort-defaults-w4a8": "onnxruntime defaults, int4 weights",
         "upgrade-ort-defaults-w4a8": "↳ upgraded with CWAC",
         "ort-pp_per_tensor-w8a8": "onnxruntime per-tensor weights (W8A8)",
         "upgrade-ort-pp_per_tensor-w8a8": "↳ upgraded with CWAC",
         "ort-pp_per_tensor-w4a8": "onnxruntime per-tensor int4 weights",
         "upgrade-ort-pp_per_tensor-w4a8": "↳ upgraded with CWAC"}


def _cell(metrics: dict | None, keys: list[str]) -> str:
    if not metrics:
        return "–"
    return " / ".join(f"{metrics[k]:.3f}" if k in metrics else "–" for k in keys)


def _sqnr(row: dict, kind: str) -> str:
    fid = row.get("output_fidelity", {}).get(kind)
    if not fid:
        return "–"
    return " / ".join(f"{v['sqnr_db']:.1f}" for v in fid.values())


def _cwac(row: dict) -> str:
    c = row.get("cwac")
    if not c:
        return "–"
    return (f"{c['target']}, {c['compensated']}/{c['layers'] if 'layers' in c else row.get('layers')} layers, "
            f"{c['stages']} stages, fit {c['fit_s']}s")


def model_table(model: str, entry: dict, ort: dict) -> list[str]:
    keys = HEADLINE.get(model, sorted(entry.get("float", {})))
    lines = [f"## {model}", "", f"Task metric: {' / '.join(keys)}.  Output SQNR (dB) vs float on the evaluation "
             "inputs, per graph output.", "",
             "| variant | simulated | deployed | deployed SQNR | compile (s) | CWAC | integer kernels |",
             "|---|---|---|---|---:|---|---|",
             f"| float | {_cell(entry.get('float'), keys)} | {_cell(entry.get('float'), keys)} | – | – | – | – |"]
    o = ort.get(model)
    if o:
        lines.append(f"| onnxruntime `quantize_static` defaults | – | {_cell(o.get('defaults_metrics'), keys)} | – | – "
                     "| – | – |")
        lines.append(f"| onnxruntime best of {o['n_configs_tried']} (`{o['best_config']}`) | – | "
                     f"{_cell(o['metrics'], keys)} | – | {o['quantize_s']} | – | – |")
    for variant in ORDER:
        row = entry.get(variant)
        if not row or "error" in row:
            if row:
                lines.append(f"| {LABEL[variant]} | failed: {row['error'][:80]} | | | | | |")
            continue
        label = LABEL[variant] + (f" (`{row['options']}`)" if row.get("options") else "")
        lines.append(f"| {label} | {_cell(row.get('simulated'), keys)} | {_cell(row.get('deployed'), keys)} | "
                     f"{_sqnr(row, 'deployed')} | {row.get('compile_s', '–')} | {_cwac(row)} | {row.get('fusion', '–')} |")
    return lines + [""]


def _pairs(results: dict, variants: dict[str, tuple[str, str]]):
    """(model, first headline metric, its float value, tag, before row, CWAC row) for every measured pair."""
    for model, entry in results.items():
        key = HEADLINE.get(model, [None])[0]
        f = entry.get("float", {}).get(key)
        for tag, (before, after) in variants.items():
            a, b = entry.get(before), entry.get(after)
            if a and b and "deployed" in b and "cwac" in b:
                yield model, key, f, tag, a, b


def _worse(cwac: dict) -> str:
    """The chosen target's per-sample account: held-out samples it made worse, of n, and what their rises
    add up to as a fraction of no compensation's held-out error (– where the row predates the account)."""
    acc, target = cwac.get("held_out_samples"), cwac["target"]
    if not acc or target not in acc["worse_than_none"]:
        return "–"
    added = acc["added_error"][target]
    return f"{acc['worse_than_none'][target]}/{acc['n']}" + (f" (+{added:.1%})" if added else "")


def cwac_table(results: dict) -> list[str]:
    """Plain vs CWAC, deployed headline metric, gap recovered, and the fold's invariants."""
    lines = ["## CWAC summary (deployed, first headline metric)", "",
             "*gap recovered* = (CWAC − plain) / (float − plain), where plain < float.  *held-out output error*: "
             "Σ over outputs of MSE / mean(float²) on the held-out calibration part, the quantity the gate "
             "judges by (none → chosen); *samples worse*: held-out samples whose share of that error the chosen "
             "target raised, and what the rises add up to as a fraction of the error without CWAC.  *fold check*: "
             "max relative difference fused vs unfused given the same "
             "activation codes (outputs and every quantizer input), from each compile's own check (on 16 of its "
             "calibration samples; docs/CWAC.md has 16 unseen samples per model, tools/fold_check_zoo.py); *ops*: "
             "fused op histogram == plain.  The default "
             "evaluation sets are small (20 det images, 60 YOLOv8n images, 2000 cls lines): where variants are a "
             "sample or two apart, read the larger sets below.", "",
             "| model | bits/target | float | plain | CWAC | gap recovered | SQNR plain → CWAC (dB) | "
             "held-out output error | samples worse | fold check | ops equal |",
             "|---|---|---:|---:|---:|---:|---|---|---|---:|---|"]
    for model, key, f, tag, plain, cw in _pairs(results, {t: (f"ours-{t}-plain", f"ours-{t}")
                                                           for t in ("w8a8-ort", "w8a8-trt", "w4a8-ort")}):
        p, c = plain["deployed"][key], cw["deployed"][key]
        gap = f"{(c - p) / (f - p):.0%}" if f is not None and f - p > 1e-9 else "–"
        err = cw["cwac"]["output_error"]
        chk = cw["cwac"]["fold_check"]
        worst = max([*chk["forced_max_rel"].values(),
                     *chk.get("forced_layer_max_rel", chk.get("forced_quantizer_max_rel", {})).values()])
        lines.append(f"| {model} | {tag} | {f:.4f} | {p:.4f} | {c:.4f} | {gap} | {_sqnr(plain, 'deployed')} → "
                     f"{_sqnr(cw, 'deployed')} | {err['none']:.3g} → {err[cw['cwac']['target']]:.3g} "
                     f"({cw['cwac']['target']}) | {_worse(cw['cwac'])} | {worst:.1e} | "
                     f"{cw.get('op_histogram_equal_plain')} |")
    return lines + [""]


def upgrade_table(results: dict) -> list[str]:
    """Upgrade mode: onnxruntime's model vs the same model upgraded with CWAC, and what the upgrade costs."""
    lines = ["## Upgrade mode summary (deployed, first headline metric)", "",
             "onnxruntime `quantize_static` with its best W8A8 configuration, its defaults (QDQ, per-channel; on "
             "the Paddle models every weight is then quantized as an activation, per tensor, and int4 does not "
             "apply) and per-tensor weights after its pre-processing (`pp_per_tensor`), each also with int4 "
             "weights, upgraded with CWAC on its own grid.  *inserted*: ops the "
             "fold added to the QDQ graph (none is the goal); *runtime ops*: what onnxruntime's optimized graph "
             "runs, upgraded minus input (onnxruntime turns a float Conv bias into int32 + DequantizeLinear "
             "itself: docs/CWAC.md).", "",
             "| model | bits | onnxruntime config | float | onnxruntime | upgraded | SQNR (dB) | held-out output "
             "error | samples worse | inserted | runtime ops | integer kernels (input → upgraded) |",
             "|---|---|---|---:|---:|---:|---|---|---|---|---|---|"]
    pairs = {(b, c): (f"ort-{c}-{b}", f"upgrade-ort-{c}-{b}") for c in ("best", "defaults", "pp_per_tensor")
             for b in ("w8a8", "w4a8")}
    for model, key, f, (bits, config), base, up in _pairs(results, pairs):
        c = up["cwac"]
        err = c["output_error"]
        diff = up.get("runtime_op_diff")
        runtime = "–" if diff is None else ", ".join(f"{k} {v:+d}" for k, v in diff.items()) or "same"
        lines.append(f"| {model} | {bits} | {config} | {f:.4f} | {base['deployed'][key]:.4f} | "
                     f"{up['deployed'][key]:.4f} | "
                     f"{_sqnr(base, 'deployed')} → {_sqnr(up, 'deployed')} | {err['none']:.3g} → "
                     f"{err[c['target']]:.3g} ({c['target']}) | {_worse(c)} | {len(c.get('inserted_ops', []))} | "
                     f"{runtime} | "
                     f"{base.get('fusion', '–')} → {up.get('fusion', '–')} |")
    return lines + [""]


def _isa() -> str:
    """The CPU's integer-dot-product flags (what decides onnxruntime's u8·s8 kernel), from /proc/cpuinfo."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown"
    have = [f for f in ("avx2", "avx512_vnni", "avx_vnni", "amx_int8") if f" {f}" in flags]
    return ", ".join(have) + ("" if any("vnni" in f for f in have) else " (no VNNI)")


def large_eval_table(large: dict) -> list[str]:
    """tools/zoo_large_eval.py: W8A8 variants on larger evaluation sets, deployed."""
    if not large:
        return []
    lines = ["## Larger evaluation sets (deployed)", "",
             "Where the default evaluation set is too small to rank the variants (one or two samples apart), "
             "`python tools/zoo_large_eval.py MODEL --size n_eval=N [--wbits 4]` re-runs them on a larger set from "
             "the same generator, same 64 calibration samples: W8A8, or W4A8 where the title says so.", ""]
    for model, entry in large.items():
        if "draws" in entry:
            continue  # calib_draws_table
        rows = entry["rows"]
        keys = [k for k in rows["float"] if k != "float_n_dets"]
        sizes = ", ".join(f"{k}={v}" for k, v in entry["sizes"].items())
        lines += [f"**{model}** ({sizes}; onnxruntime best: `{entry['best_config']}`)", "",
                  "| variant | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
        lines += [f"| {name} | " + " | ".join(f"{r[k]:.4f}" for k in keys) + " |" for name, r in rows.items()]
        lines.append("")
        for pair, m in entry.get("paired", {}).items():
            first, second = pair.split(" -> ")
            lines.append(f"* paired, {first} → {second}: {m['only_first_right']} samples only the first got right, "
                         f"{m['only_second_right']} only the second; exact McNemar p = {m['p_value']:.3g}")
        if entry.get("paired"):
            lines.append("")
    return lines


def calib_draws_table(large: dict) -> list[str]:
    """tools/zoo_large_eval.py --calib-draws: the same comparison on several calibration sets."""
    lines = []
    for key, entry in large.items():
        if "draws" not in entry:
            continue
        pairs = [p.split(" -> ") for p in entry["draws"][0]["paired_acc"]]
        variants = [v for pair in pairs for v in pair]
        sizes = ", ".join(f"{k}={v}" for k, v in entry["sizes"].items())
        lines += [f"**{key}** ({sizes}, {entry['n_calib']} calibration samples per draw; float accuracy "
                  f"{entry['float']['acc']:.4f}; draw 0 is the calibration set of every other table)", "",
                  "| draw | " + " | ".join(f"{v}: acc / agree" for v in variants) + " |",
                  "|---|" + "---|" * len(variants)]
        for d in entry["draws"]:
            lines.append(f"| {d['draw']} | " + " | ".join(
                f"{d['rows'][v]['acc']:.4f} / {d['rows'][v]['agree_float']:.4f}" for v in variants) + " |")
        lines.append("")
        for name, m in entry["summary"].items():
            lines.append(f"* {name.replace(' -> ', ' → ')}: higher in {m['second_higher']} draws, equal in {m['equal']}, lower in "
                         f"{m['second_lower']}; mean difference {m['mean_diff']:+.5f}, median {m['median_diff']:+.5f}")
        lines.append("")
    if lines:
        lines = ["## Calibration draws (deployed)", "",
                 "Where two variants are a few samples apart, `python tools/zoo_large_eval.py MODEL --size "
                 "n_eval=N --calib-draws K` repeats the comparison on K calibration sets from the same generator "
                 "(same evaluation set): a difference that changes sign with the calibration data is noise.", ""] + lines
    return lines


def _add_f1(node) -> None:
    """F1 for every metrics dict with recall and precision but none recorded (results from before it was)."""
    if isinstance(node, dict):
        if "recall" in node and "precision" in node and "f1" not in node:
            node["f1"] = f1(node["recall"], node["precision"])
        for v in node.values():
            _add_f1(v)


def render(results: dict, ort: dict, large: dict | None = None) -> str:
    for tree in (results, ort, large):
        _add_f1(tree)
    lines = ["# Zoo results: float vs onnxruntime quantize_static vs qwt2-onnx (plain PTQ and CWAC)", "",
             "Regenerate: `python tools/zoo_eval.py && python tools/zoo_upgrade.py && python tools/zoo_report.py` "
             f"(onnxruntime {onnxruntime.__version__}, {platform.machine()}, 2 cores, CPU flags: {_isa()}).",
             "Every variant calibrates on the same 64 samples of the task's calibration set (tools/zoo_tasks.py); "
             "CWAC fits on them too (48 fit + 16 held out for its gates).",
             "*deployed*: onnxruntime CPU with all graph optimizations (integer kernels); *simulated*: optimizations "
             "off (every Q/DQ in float).  onnxruntime's sweep rows are deployed only, as users run them.", ""]
    lines += cwac_table(results)
    lines += upgrade_table(results)
    lines += large_eval_table(large or {})
    lines += calib_draws_table(large or {})
    for model, entry in results.items():
        lines += model_table(model, entry, ort)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=Path("docs/zoo_results.json"))
    ap.add_argument("--ort", type=Path, default=Path("tools/ort_best_configs.json"))
    ap.add_argument("--large", type=Path, default=Path("docs/zoo_large_eval.json"))
    ap.add_argument("--out", type=Path, default=Path("docs/ZOO.md"))
    args = ap.parse_args()
    ort = json.loads(args.ort.read_text()) if args.ort.exists() else {}
    large = json.loads(args.large.read_text()) if args.large.exists() else {}
    args.out.write_text(render(json.loads(args.json.read_text()), ort, large))
    print(args.out.read_text())


if __name__ == "__main__":
    main()
