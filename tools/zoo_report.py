"""Render docs/zoo_results.json (written by tools/zoo_eval.py) into docs/ZOO.md.

    python tools/zoo_report.py [--json docs/zoo_results.json] [--out docs/ZOO.md]
"""
from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import onnxruntime

HEADLINE = {"ppocr_rec": ["char_acc_en", "char_acc_zh"], "ppocr_cls": ["acc"], "orientation": ["acc"],
            "ppocr_det": ["gt_recall", "map_iou"], "yolov8n": ["recall", "precision", "score_cos"]}
ORDER = ["ort-defaults", "ort-best", "ours-w8a8-ort", "ours-w8a8-trt", "ours-w4a8-ort", "ort-w4a8"]


def _cell(metrics: dict | None, keys: list[str]) -> str:
    if not metrics:
        return "–"
    return " / ".join(f"{metrics[k]:.3f}" if k in metrics else "–" for k in keys)


def render(results: dict) -> str:
    lines = ["# Zoo results: task metrics, float vs onnxruntime quantize_static vs qwt2-onnx", "",
             "Regenerate: `python tools/zoo_eval.py && python tools/zoo_report.py` "
             f"(onnxruntime {onnxruntime.__version__}, {platform.machine()}, 2 cores, AVX2 without VNNI).",
             "Every variant calibrates on the same 64 samples of the task's calibration set (tools/zoo_tasks.py).",
             "*deployed*: onnxruntime CPU with all graph optimizations (integer kernels); *simulated*: optimizations",
             "off (every Q/DQ in float).  onnxruntime's own models are only shown deployed, as users run them.", ""]
    for model, entry in results.items():
        keys = HEADLINE.get(model, sorted(entry.get("float", {})))
        lines += [f"## {model}", "", f"Metric: {' / '.join(keys)}", "",
                  "| variant | simulated | deployed | compile (s) | integer kernels |", "|---|---|---|---:|---|",
                  f"| float | {_cell(entry.get('float'), keys)} | {_cell(entry.get('float'), keys)} | – | – |"]
        for variant in ORDER:
            row = entry.get(variant)
            if row is None:
                continue
            label = variant + (f" (`{row['options']}`)" if row.get("options") else "")
            lines.append(f"| {label} | {_cell(row.get('simulated'), keys)} | {_cell(row.get('deployed'), keys)} | "
                         f"{row.get('compile_s', '–')} | {row.get('fusion', '–')} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=Path("docs/zoo_results.json"))
    ap.add_argument("--out", type=Path, default=Path("docs/ZOO.md"))
    args = ap.parse_args()
    args.out.write_text(render(json.loads(args.json.read_text())))
    print(args.out.read_text())


if __name__ == "__main__":
    main()
