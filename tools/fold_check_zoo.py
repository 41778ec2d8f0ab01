"""Fused vs unfused on the zoo, on unseen inputs, next to a rounding control.

    python tools/fold_check_zoo.py [names...] [--variants w8a8-ort w4a8-ort] [--n-check 16]
        [--json docs/fold_check.json]

Per zoo model and variant: compile with CWAC on the zoo's 64 calibration
samples (as tools/zoo_eval.py), keep the unfused graph, and run
``equivalence.check_fold`` on ``--n-check`` further samples of the task's
calibration generator (samples 64.., never seen by the compile):

* *forced*: both graphs fed the unfused graph's activation codes; max relative
  difference at the outputs and at every compensated layer's output;
* *free*: both graphs running on their own; activation codes that differ and
  the outputs' max relative difference.

The *control* asks how much of the free-running difference any float rounding
change produces, with no fold at all: the plain ``--no-cwac`` graph against
the same graph with every weight DequantizeLinear scale moved by one float32
ulp (``np.nextafter``, ~1e-7 relative, the size of the rounding the fold
introduces).  Both graphs compute the same function up to float rounding,
exactly as the fused and unfused graphs do.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import numpy_helper  # noqa: E402

from qwt2_onnx import CompileConfig, compile_model  # noqa: E402
from qwt2_onnx.calib_data import InputSpec, open_calibration  # noqa: E402
from qwt2_onnx.equivalence import check_fold  # noqa: E402
from zoo import fetch_model  # noqa: E402
from zoo_eval import VARIANTS  # noqa: E402
from zoo_tasks import TASKS  # noqa: E402


def nudged_weight_scales(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every constant-weight DequantizeLinear scale moved up by one float32 ulp."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name: t for t in out.graph.initializer}
    done = set()
    for n in out.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits and n.input[1] in inits and n.input[1] not in done:
            s = numpy_helper.to_array(inits[n.input[1]])
            if s.dtype == np.float32:
                inits[n.input[1]].CopyFrom(numpy_helper.from_array(np.nextafter(s, np.float32(np.inf)), n.input[1]))
                done.add(n.input[1])
    return out


def _summary(check) -> dict:
    forced = max([s.max_rel for s in check.forced_outputs.values()], default=0.0)
    return {"forced_output_max_rel": forced, "forced_worst_max_rel": check.worst_forced,
            "free_output_max_rel": max([s.max_rel for s in check.free_outputs.values()], default=0.0),
            "codes": check.codes, "flipped": check.flipped, "flipped_frac": check.flipped / max(check.codes, 1),
            "max_code_diff": check.max_code_diff}


def run(name: str, variant: str, n_check: int, workdir: Path) -> dict:
    task, model = TASKS[name], fetch_model(name)
    feeds = task.calib_feeds(model, 64 + n_check)
    samples = [{k: v[i:i + 1] for k, v in feeds.items()} for i in range(64 + n_check)]
    specs = InputSpec.from_model(onnx.load(str(model), load_external_data=False))
    check_data = open_calibration(samples[64:], specs)
    out, unfused_path = workdir / f"{name}.{variant}.onnx", workdir / f"{name}.{variant}.unfused.onnx"
    quant, cwac = VARIANTS[variant]
    res = compile_model(model, samples[:64], out, CompileConfig(quant=quant, cwac=cwac, holdout_samples=0),
                        measure=False, unfused_path=unfused_path)
    fold = check_fold(res.model, onnx.load(str(unfused_path)), check_data, 8)
    control = check_fold(nudged_weight_scales(res.plain_model), res.plain_model, check_data, 8)
    row = {"compensated": len(res.cwac.compensations), "layers": len(res.plan.layers),
           "fold": _summary(fold), "control": _summary(control)}
    print(f"{name} {variant}: {row}", flush=True)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*")
    ap.add_argument("--variants", nargs="+", default=["w8a8-ort", "w4a8-ort"])
    ap.add_argument("--n-check", type=int, default=16)
    ap.add_argument("--json", type=Path, default=Path("docs/fold_check.json"))
    args = ap.parse_args()
    results = json.loads(args.json.read_text()) if args.json.exists() else {}
    with tempfile.TemporaryDirectory() as d:
        for name in args.names or list(TASKS):
            for variant in args.variants:
                results.setdefault(name, {})[variant] = run(name, variant, args.n_check, Path(d))
                args.json.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
