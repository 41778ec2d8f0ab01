"""Are the written models (and the check reports) bit-identical to a saved run?  The gate for every change
that should leave results alone (speed work, refactors).

    python tools/bitcheck.py save  FILE [--models a,b] [--configs ort,trt]   # digests of the current code
    python tools/bitcheck.py check FILE                                      # the same runs, compared

Each run is one ``qwt2-onnx compile`` process on a corpus model (``tools/corpus.py prepare`` caches them)
with its 16 calibration samples; its digest is the sha256 of the written model's bytes, and of the JSON
report with its creation time removed.  ``check`` prints one line per run and exits 1 if any model
digest differs (a report-only difference is printed, and counted, but is not a failure: say why in the
commit when it happens).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from corpus import corpus_dir  # noqa: E402

MODELS = ("ppocr_cls", "orientation", "oww_embedding", "oww_hey_jarvis", "silero_vad_op15", "yolov8n", "minilm_l6")
CONFIGS = {"ort": [], "trt": ["--target", "trt"], "w4": ["--wbits", "4"]}


def digest(model: str, config: str, work: Path) -> dict:
    src = corpus_dir() / "models" / model
    out = work / f"{model}.{config}.onnx"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "qwt2_onnx", "compile", str(src / "model.onnx"), "--calib",
                           str(src / "calib.npz"), "-o", str(out), *CONFIGS[config]],
                          capture_output=True, text=True)
    seconds = round(time.perf_counter() - t0, 1)
    if proc.returncode != 0:
        return {"rc": proc.returncode, "stderr": proc.stderr[-2000:], "seconds": seconds}
    return {"rc": 0, **output_digests(out), "seconds": seconds}


def output_digests(out: Path) -> dict[str, str]:
    """sha256 of a written model's bytes (with its external data), and of its JSON report minus its creation
    time."""
    report = json.loads(out.with_name(out.name.removesuffix(".onnx") + ".report.json").read_text())
    report.pop("created", None)
    data = out.with_name(out.name + ".data")
    model_bytes = out.read_bytes() + (data.read_bytes() if data.exists() else b"")
    return {"model": hashlib.sha256(model_bytes).hexdigest(),
            "report": hashlib.sha256(json.dumps(report, sort_keys=True).encode()).hexdigest()}


def run_all(runs: list[tuple[str, str]]) -> dict:
    results = {}
    with tempfile.TemporaryDirectory(prefix="bitcheck.") as tmp:
        for model, config in runs:
            results[f"{model}/{config}"] = r = digest(model, config, Path(tmp))
            print(f"{model}/{config}: rc={r['rc']} {r.get('model', '')[:12]} {r['seconds']}s", flush=True)
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("save", "check"))
    ap.add_argument("file", type=Path)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--configs", default="ort,trt")
    a = ap.parse_args()
    if a.mode == "save":
        runs = [(m, c) for m in a.models.split(",") for c in a.configs.split(",")]
        a.file.write_text(json.dumps(run_all(runs), indent=1) + "\n")
        return 0
    saved = json.loads(a.file.read_text())
    now = run_all([tuple(k.split("/")) for k in saved])
    model_diffs = report_diffs = 0
    for key, old in saved.items():
        new = now[key]
        same_model = old.get("model") == new.get("model") and old["rc"] == new["rc"]
        same_report = old.get("report") == new.get("report")
        model_diffs += not same_model
        report_diffs += not same_report
        print(f"{key:32s} model {'same' if same_model else 'DIFFERENT'}  report {'same' if same_report else 'different'}"
              f"  {old['seconds']}s -> {new['seconds']}s")
    print(f"{len(saved)} runs: {model_diffs} model(s) differ, {report_diffs} report(s) differ")
    return 1 if model_diffs else 0


if __name__ == "__main__":
    raise SystemExit(main())
