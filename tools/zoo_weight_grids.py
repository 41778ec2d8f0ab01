"""Which zoo inputs upgrade mode warns about: per-tensor weight grids set by a few wide channels.

    python tools/zoo_weight_grids.py [names...] [--configs best defaults pp_per_tensor] [--n-calib 64]
                                     [--json docs/weight_grids.json]

Per zoo model, onnxruntime ``quantize_static`` quantizes it as tools/zoo_upgrade.py does (each
configuration, int8 and int4 weights; int4 skipped where onnxruntime wrote none), and upgrade mode's
planning step lists the layers
``policy.coarse_weight_grids`` flags: weights quantized per tensor whose median output channel spans
under 1/8 of the grid's steps.  No CWAC fit and no evaluation (the task metrics of the same models are
in docs/ZOO.md's upgrade table); a few minutes on the whole zoo.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import onnx  # noqa: E402

from qwt2_onnx.model_io import read_model  # noqa: E402
from qwt2_onnx.pipeline import normalize_upgrade_inputs, plan_upgrade  # noqa: E402
from zoo import fetch_model  # noqa: E402
from zoo_ort_baseline import _quiet, ort_options, ort_quantize  # noqa: E402
from zoo_tasks import TASKS  # noqa: E402


def scan(qdq_path, float_path) -> dict:
    """What upgrade mode's planning step finds in a QDQ model: its layers and the coarse weight grids."""
    float_model, plain, _ = normalize_upgrade_inputs(read_model(qdq_path)[0], read_model(float_path)[0])
    plan, coarse = plan_upgrade(plain, float_model)
    return {"layers": len(plan.layers), "coarse_weight_grids": coarse}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", default=sorted(TASKS))
    ap.add_argument("--configs", nargs="+", default=["best", "defaults", "pp_per_tensor"])
    ap.add_argument("--n-calib", type=int, default=64)
    ap.add_argument("--json", type=Path, default=Path("docs/weight_grids.json"))
    args = ap.parse_args()
    results = json.loads(args.json.read_text()) if args.json.exists() else {}
    _quiet()
    with tempfile.TemporaryDirectory() as d:
        for name in args.names:
            model = fetch_model(name)
            feeds = TASKS[name].calib_feeds(model, args.n_calib)
            for config in args.configs:
                for wbits in (8, 4):
                    options = ort_options(name, config, wbits)
                    qpath = Path(d) / f"{name}.{config}.w{wbits}.onnx"
                    ort_quantize(model, feeds, qpath, **options)
                    if wbits == 4 and not any(t.data_type == onnx.TensorProto.INT4
                                              for t in onnx.load(qpath).graph.initializer):
                        print(f"{name} {config} w4a8: skipped, onnxruntime wrote no int4 weight", flush=True)
                        continue
                    float_ref = str(qpath) + ".pre.onnx" if options.get("pre_process") else model
                    results[f"{name} {config} w{wbits}a8"] = row = scan(qpath, float_ref)
                    worst = sorted(row["coarse_weight_grids"].items(), key=lambda kv: kv[1]["median_channel_steps"])
                    print(f"{name} {config} w{wbits}a8: {len(worst)} of {row['layers']} layers flagged"
                          + "".join(f"; {k} median {v['median_channel_steps']:g} of {v['grid_steps']}"
                                    for k, v in worst[:2]), flush=True)
    args.json.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
