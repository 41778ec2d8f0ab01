"""Upgrade mode on TensorRT's own quantizer: NVIDIA Model Optimizer's ONNX PTQ, then CWAC on its grid.

    pip install --no-deps nvidia-modelopt==0.47.0      # --no-deps: it would pull an unpinned torch,
    pip install tqdm nvidia-ml-py onnxslim onnxscript lief  # cupy-cuda12x and onnxruntime-gpu
    python tools/zoo_modelopt.py [names...] [--size NAME:N_FIELD=VALUE ...] [--n-calib 64]
                                 [--weights-as-initializers] [--json docs/modelopt_upgrade.json]

Per zoo model, ``modelopt.onnx.quantization.quantize`` writes TensorRT's INT8
QDQ model (symmetric int8 activations and weights, ``max`` calibration on the
zoo's 64 calibration samples, float32 kept: ``high_precision_dtype="fp32"``,
calibrated on onnxruntime's CPU provider); ``upgrade_model`` fits CWAC on
that model's grid against the float model, ``--target trt`` (float bias).
Both models' task metric is measured in float simulation (onnxruntime,
optimizations off: TensorRT's arithmetic up to rounding; no GPU here) and
with onnxruntime's optimizations on.  ``--weights-as-initializers`` first
turns the float model's Constant nodes into initializers (the Paddle exports
hold their weights in Constant nodes, which Model Optimizer quantizes per
tensor, like activations); its rows are stored as "NAME (weights as
initializers)".  Not part of CI (the package is not a
dependency); run by hand, results in the JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import onnx  # noqa: E402

from qwt2_onnx import CompileConfig, QuantConfig  # noqa: E402
from qwt2_onnx.passes.normalize import constants_to_initializers  # noqa: E402
from qwt2_onnx.pipeline import upgrade_model  # noqa: E402
from zoo import fetch_model  # noqa: E402
from zoo_eval import session  # noqa: E402
from zoo_ort_baseline import _quiet  # noqa: E402
from zoo_tasks import TASKS  # noqa: E402


def modelopt_quantize(model: Path, feeds: dict, out: Path) -> float:
    """TensorRT's INT8 QDQ model of ``model`` at ``out``; returns seconds."""
    try:
        from modelopt.onnx.quantization import quantize
    except ImportError as e:
        raise SystemExit(f"nvidia-modelopt is not installed ({e}); see this script's docstring") from None
    t0 = time.perf_counter()
    quantize(str(model), quantize_mode="int8", calibration_data=feeds, calibration_method="max",
             output_path=str(out), calibration_eps=["cpu"], high_precision_dtype="fp32")
    return time.perf_counter() - t0


def weights_as_initializers(model: Path, out: Path) -> Path:
    """``model`` with its Constant nodes turned into initializers, at ``out`` (same function)."""
    proto = onnx.load(str(model))
    constants_to_initializers(proto)
    onnx.save(proto, str(out))
    return out


def run(name: str, task, n_calib: int, workdir: Path, initializers: bool = False) -> dict:
    model = fetch_model(name)
    if initializers:
        model = weights_as_initializers(model, workdir / f"{name}.init.onnx")
    feeds = task.calib_feeds(model, n_calib)
    qpath, out = workdir / f"{name}.modelopt.onnx", workdir / f"{name}.modelopt.cwac.onnx"
    mo_s = modelopt_quantize(model, feeds, qpath)
    samples = [{k: v[i:i + 1] for k, v in feeds.items()} for i in range(n_calib)]
    t0 = time.perf_counter()
    res = upgrade_model(qpath, model, samples, out, CompileConfig(quant=QuantConfig(target="trt"), holdout_samples=0),
                        measure=False)
    row = {"modelopt_s": round(mo_s, 1), "upgrade_s": round(time.perf_counter() - t0, 1),
           "layers": len(res.plan.layers), "skipped": res.plan.skipped, "cwac": res.cwac.gate_record().to_dict(),
           "fold_check": (res.fold_check.summary() if res.fold_check is not None else None), "inserted_ops": res.stages.fold.inserted_ops}
    fsess = session(str(model), True)
    row["float"] = task.evaluate(fsess, fsess)
    for label, path in (("modelopt", qpath), ("upgraded", out)):
        for kind, optimized in (("simulated", False), ("onnxruntime optimized", True)):
            row[f"{label} {kind}"] = task.evaluate(session(str(path), optimized), fsess)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*")
    ap.add_argument("--size", action="append", default=[], metavar="NAME:N_FIELD=VALUE",
                    help="evaluation-set size override, e.g. yolov8n:n_eval=300 (repeatable)")
    ap.add_argument("--n-calib", type=int, default=64)
    ap.add_argument("--weights-as-initializers", action="store_true",
                    help="turn the float model's Constant nodes into initializers before quantizing")
    ap.add_argument("--json", type=Path, default=Path("docs/modelopt_upgrade.json"))
    args = ap.parse_args(argv)
    _quiet()
    sizes: dict[str, dict[str, int]] = {}
    for s in args.size:
        name, field = s.split(":", 1)
        key, value = field.split("=", 1)
        sizes.setdefault(name, {})[key] = int(value)
    results = json.loads(args.json.read_text()) if args.json.exists() else {}
    with tempfile.TemporaryDirectory() as d:
        for name in args.names or list(TASKS):
            task = type(TASKS[name])(**sizes.get(name, {}))
            row = run(name, task, args.n_calib, Path(d), args.weights_as_initializers)
            row["sizes"] = sizes.get(name, {})
            key = f"{name} (weights as initializers)" if args.weights_as_initializers else name
            results[key] = row
            print(f"{key}: modelopt {row['modelopt simulated']} -> upgraded {row['upgraded simulated']}", flush=True)
            args.json.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
