"""Upgrade mode on the zoo: CWAC fitted and folded on onnxruntime ``quantize_static`` output.

    python tools/zoo_upgrade.py [names...] [--bits w8a8 w4a8] [--configs best defaults pp_per_tensor]
                                [--n-calib 64] [--json docs/zoo_results.json]

Per zoo model, onnxruntime quantizes it with its best configuration found by
``tools/zoo_ort_baseline.py --sweep`` (``best_<model>`` in ORT_CONFIGS), with
its defaults (QDQ, per-channel: on the Paddle models, whose weights are
Constant nodes, that quantizes every weight as an activation, per tensor) and
with per-tensor weights after its pre-processing (``pp_per_tensor``), at W8A8,
and with the same options and int4 weights (``weight_type=QInt4``, without
``reduce_range``, which would leave int4 weights nine levels, [-4, 4]) at
W4A8 -- skipped where onnxruntime wrote no int4 weight (its defaults on the
Paddle models).  ``upgrade_model`` then fits CWAC on that model's own grid
against the float model onnxruntime quantized (its ``quant_pre_process``
output when the configuration pre-processes).  The task metric of both is
measured simulated (optimizations off) and deployed (all optimizations), on
the same calibration samples as every other variant.  Results merge into the
JSON as ``ort-<config>-<bits>`` and ``upgrade-ort-<config>-<bits>``.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import onnx  # noqa: E402

from qwt2_onnx import CompileConfig  # noqa: E402
from qwt2_onnx.inspect_ort import fusion_report  # noqa: E402
from qwt2_onnx.pipeline import upgrade_model  # noqa: E402
from zoo import fetch_model  # noqa: E402
from zoo_eval import evaluate, session  # noqa: E402
from zoo_ort_baseline import _quiet, ort_options, ort_quantize  # noqa: E402
from zoo_tasks import TASKS  # noqa: E402


class _NotInt4(Exception):
    """onnxruntime ignored weight_type=QInt4 (weights it quantizes as activations stay 8-bit)."""


def run(name: str, bits: str, n_calib: int, workdir: Path, config: str = "best") -> tuple[dict, dict]:
    task, model = TASKS[name], fetch_model(name)
    feeds = task.calib_feeds(model, n_calib)
    options = ort_options(name, config, 4 if bits == "w4a8" else 8)
    qpath = workdir / f"{name}.{bits}.{config}.ort.onnx"
    t0 = time.perf_counter()
    ort_quantize(model, feeds, qpath, **options)
    ort_s = time.perf_counter() - t0
    if bits == "w4a8" and not any(t.data_type == onnx.TensorProto.INT4 for t in onnx.load(qpath).graph.initializer):
        raise _NotInt4(f"onnxruntime wrote no int4 weight with {options}")
    float_ref = Path(str(qpath) + ".pre.onnx") if options.get("pre_process") else model
    samples = [{k: v[i:i + 1] for k, v in feeds.items()} for i in range(n_calib)]
    out = workdir / f"{name}.{bits}.{config}.upgraded.onnx"
    t0 = time.perf_counter()
    res = upgrade_model(qpath, float_ref, samples, out, CompileConfig(holdout_samples=0))
    up_s = time.perf_counter() - t0
    fsess = session(str(model), True)
    ops = lambda m: Counter(n.op_type for n in m.graph.node)  # noqa: E731
    before = fusion_report(res.plain_model, res.plan.integer_weights(res.plain_model))  # the input, as normalized
    base = {"model": name, "variant": f"ort-{config}-{bits}", "options": options, "compile_s": round(ort_s, 1),
            "fusion": before.summary()}
    base_metrics, base["output_fidelity"] = evaluate(task, str(qpath), fsess)
    base.update(base_metrics)
    up = {"model": name, "variant": f"upgrade-ort-{config}-{bits}", "compile_s": round(up_s, 1),
          "fusion": res.fusion.summary(), "layers": len(res.plan.layers), "skipped": res.plan.skipped,
          "cwac": {**res.cwac.summary(len(res.plan.layers)), "fit_s": round(res.cwac.seconds, 1),
                   "fold_check": (res.fold_check.summary() if res.fold_check is not None else None), "inserted_ops": res.stages.fold.inserted_ops,
                   "strategies": dict(Counter(res.stages.fold.strategies.values()))},
          "op_histogram_equal_input": ops(res.model) == ops(res.plain_model),
          # what onnxruntime runs (its optimized graph), upgraded minus input: the runtime cost of inserted ops
          "runtime_op_diff": {k: res.fusion.op_histogram.get(k, 0) - before.op_histogram.get(k, 0)
                              for k in sorted(set(res.fusion.op_histogram) | set(before.op_histogram))
                              if res.fusion.op_histogram.get(k, 0) != before.op_histogram.get(k, 0)}}
    up_metrics, up["output_fidelity"] = evaluate(task, str(out), fsess)
    up.update(up_metrics)
    return base, up


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*")
    ap.add_argument("--bits", nargs="+", default=["w8a8", "w4a8"])
    ap.add_argument("--configs", nargs="+", default=["best", "defaults", "pp_per_tensor"],
                    choices=["best", "defaults", "pp_per_tensor"])
    ap.add_argument("--n-calib", type=int, default=64)
    ap.add_argument("--json", type=Path, default=Path("docs/zoo_results.json"))
    args = ap.parse_args(argv)
    _quiet()
    results = json.loads(args.json.read_text()) if args.json.exists() else {}
    with tempfile.TemporaryDirectory() as d:
        for name in args.names or list(TASKS):
            for bits in args.bits:
                for config in args.configs:
                    key = f"upgrade-ort-{config}-{bits}"
                    try:
                        base, up = run(name, bits, args.n_calib, Path(d), config)
                    except _NotInt4 as e:
                        print(f"{name} {bits} {config}: skipped, {e}", flush=True)
                        continue
                    except Exception as e:  # noqa: BLE001  (record, go on with the next model)
                        print(f"{name} {bits} {config}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
                        results.setdefault(name, {})[key] = {"error": f"{type(e).__name__}: {e}"[:500]}
                        continue
                    entry = results.setdefault(name, {})
                    entry[base["variant"]], entry[up["variant"]] = base, up
                    print(f"{name} {bits} {config}: ort deployed {base['deployed']} -> upgraded {up['deployed']}",
                          flush=True)
                    args.json.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
