"""A zoo model on a larger evaluation set: float vs onnxruntime vs ours, W8A8, deployed.

    python tools/zoo_large_eval.py ppocr_cls --size n_eval=10000
    python tools/zoo_large_eval.py yolov8n --size n_eval=600
        [--wbits 8|4] [--n-calib 64] [--json docs/zoo_large_eval.json]

The zoo's default evaluation sets (tools/zoo_tasks.py) are sized for a full
sweep over every variant; on two models every W8A8 variant lands within one or
two evaluation samples of the others (PP-OCR cls: 2000 lines, 0.993 vs 0.994;
YOLOv8n: 60 images, ~59 float detections), too close to rank.  This tool
re-runs the W8A8 comparison on a larger set from the same generator, with the
same 64 calibration samples as tools/zoo_eval.py and tools/zoo_ort_baseline.py:
float, onnxruntime ``quantize_static`` (its defaults and its best
configuration), ours ``--no-cwac``, ours with CWAC (default options) and
onnxruntime's best model upgraded with CWAC (as tools/zoo_upgrade.py).
Every model runs deployed (onnxruntime, all optimizations).  ``--wbits 4``
runs the W4A8 comparison instead: ours at 4-bit weights, onnxruntime with int4
weights (its best options without ``reduce_range``, as tools/zoo_upgrade.py).
Results merge into the JSON under the model's name (``"<name> w4a8"`` for
``--wbits 4``).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from qwt2_onnx import CompileConfig, compile_model  # noqa: E402
from qwt2_onnx.config import CwacConfig, QuantConfig  # noqa: E402
from qwt2_onnx.pipeline import upgrade_model  # noqa: E402
from zoo import fetch_model  # noqa: E402
from zoo_eval import session  # noqa: E402
from zoo_ort_baseline import _CachedSession, ort_options, ort_quantize  # noqa: E402
from zoo_tasks import TASKS  # noqa: E402


PAIRS = (("ours plain", "ours CWAC"), ("onnxruntime best", "onnxruntime best upgraded with CWAC"))


def mcnemar(a: np.ndarray, b: np.ndarray) -> dict:
    """Paired comparison of two classifiers on the same samples: samples only ``a`` got right, only ``b``
    got right, and the exact two-sided McNemar p-value (binomial on the discordant samples): the
    probability of a split at least this uneven if neither model were better."""
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    n, k = only_a + only_b, min(only_a, only_b)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n) if n else 1.0
    return {"only_first_right": only_a, "only_second_right": only_b, "p_value": round(p, 4)}


def variants(task, model, feeds: dict, wbits: int, d: str) -> dict[str, str]:
    """Quantize ``model`` every way the comparison needs, on calibration ``feeds``; {variant: path} in
    ``d``."""
    n_calib = len(next(iter(feeds.values())))
    paths = {}
    best_options = ort_options(task.name, "best", wbits)
    for config in ("defaults", "best"):
        paths[f"onnxruntime {config}"] = out = f"{d}/ort_{config}.onnx"
        ort_quantize(model, feeds, out, **ort_options(task.name, config, wbits))
    calib = [{k: v[i:i + 1] for k, v in feeds.items()} for i in range(n_calib)]
    for name, cwac in (("ours plain", CwacConfig(enabled=False)), ("ours CWAC", CwacConfig())):
        paths[name] = out = f"{d}/{name.replace(' ', '_')}.onnx"
        compile_model(model, calib, out, CompileConfig(quant=QuantConfig(wbits=wbits), cwac=cwac,
                                                       holdout_samples=0), measure=False)
    best = paths["onnxruntime best"]  # upgrade mode, as tools/zoo_upgrade.py runs it
    float_ref = best + ".pre.onnx" if best_options.get("pre_process") else model
    paths["onnxruntime best upgraded with CWAC"] = out = f"{d}/ort_best_upgraded.onnx"
    upgrade_model(best, float_ref, calib, out, CompileConfig(holdout_samples=0))
    return paths


def paired_table(right: dict[str, np.ndarray]) -> dict:
    return {f"{a} -> {b}": mcnemar(right[a], right[b]) for a, b in PAIRS}


def calib_draws(task, model, args) -> dict:
    """The W8A8/W4A8 comparison repeated on ``args.calib_draws`` calibration sets (draw 0 is the zoo's),
    same evaluation set: whether a paired difference keeps its sign when only the calibration data
    changes.  Classification tasks: accuracy and agreement with float, each paired per draw."""
    float_session = _CachedSession(session(str(model), True))
    float_pred = task.predict(float_session)
    draws = []
    for draw in range(args.calib_draws):
        feeds = task.calib_feeds(model, args.n_calib, draw=draw)
        rows, right, agree = {}, {}, {}
        with tempfile.TemporaryDirectory() as d:
            for name, path in variants(task, model, feeds, args.wbits, d).items():
                pred = task.predict(session(path, True))
                right[name], agree[name] = pred == task.eval_set[1], pred == float_pred
                rows[name] = {"acc": float(right[name].mean()), "agree_float": float(agree[name].mean())}
        draws.append({"draw": draw, "rows": rows, "paired_acc": paired_table(right),
                      "paired_agree_float": paired_table(agree)})
        print(f"{task.name} draw {draw}: " + json.dumps(draws[-1]), flush=True)
    return {"float": {"acc": float(np.mean(float_pred == task.eval_set[1]))}, "draws": draws,
            "summary": summarize_draws(draws)}


def summarize_draws(draws: list[dict]) -> dict:
    """Per pair and metric: in how many draws the second variant scored higher / equal / lower than the
    first, and the mean and median of (second - first)."""
    summary = {}
    for a, b in PAIRS:
        for metric in ("acc", "agree_float"):
            diff = [r["rows"][b][metric] - r["rows"][a][metric] for r in draws]
            summary[f"{a} -> {b}: {metric}"] = {
                "second_higher": sum(x > 0 for x in diff), "equal": sum(x == 0 for x in diff),
                "second_lower": sum(x < 0 for x in diff), "mean_diff": round(float(np.mean(diff)), 6),
                "median_diff": round(float(np.median(diff)), 6)}
    return summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", choices=sorted(TASKS))
    ap.add_argument("--size", action="append", default=[], metavar="N_FIELD=VALUE",
                    help="evaluation-set size override, e.g. n_eval=10000 (repeatable)")
    ap.add_argument("--wbits", type=int, choices=[8, 4], default=8)
    ap.add_argument("--n-calib", type=int, default=64)
    ap.add_argument("--calib-draws", type=int, default=0, metavar="K",
                    help="classification tasks: repeat the comparison on K calibration sets (the zoo's and "
                         "K-1 others) and record per-draw paired results under '<name> calib draws'")
    ap.add_argument("--json", type=Path, default=Path("docs/zoo_large_eval.json"))
    args = ap.parse_args()
    sizes = dict(s.split("=", 1) for s in args.size)
    task = type(TASKS[args.name])(**{k: int(v) for k, v in sizes.items()})
    model = fetch_model(args.name)
    key = args.name if args.wbits == 8 else f"{args.name} w4a8"
    results = json.loads(args.json.read_text()) if args.json.exists() else {}
    if args.calib_draws:
        if not hasattr(task, "predict"):
            ap.error(f"--calib-draws needs a classification task; {args.name} is not one")
        results[f"{key} calib draws"] = {"sizes": sizes, "n_calib": args.n_calib,
                                         **calib_draws(task, model, args)}
        args.json.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
        return 0
    feeds = task.calib_feeds(model, args.n_calib)
    float_session = _CachedSession(session(str(model), True))  # every variant's agreement metrics rerun it
    rows = {"float": task.evaluate(float_session, float_session)}
    print(f"{args.name} float: {rows['float']}", flush=True)
    right = {"float": task.correct(float_session)}
    with tempfile.TemporaryDirectory() as d:
        for name, path in variants(task, model, feeds, args.wbits, d).items():
            sess = session(path, True)
            rows[name] = task.evaluate(sess, float_session)
            right[name] = task.correct(sess)
            print(f"{args.name} {name}: {rows[name]}", flush=True)
    paired = {}
    if right["float"] is not None:
        paired = paired_table(right)
        for pair, res in paired.items():
            print(f"{args.name} {pair}: {res}", flush=True)
    results[key] = {"sizes": sizes, "n_calib": args.n_calib,
                    "best_config": ort_options(args.name, "best", args.wbits), "rows": rows,
                    "paired": paired}
    args.json.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
