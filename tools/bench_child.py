"""One measured compile, run in its own process by tools/bench.py (peak RSS is this process's).

    python tools/bench_child.py SPEC.json RESULT.json

SPEC: ``{"kind": "ours"|"ort", "model", "calib" (.npz), "out", ...}``.
* ``ort``: ``zoo_ort_baseline.ort_quantize(model, feeds, out, **options)`` (the feeds are loaded into memory,
  as quantize_static's data reader needs them);
* ``ours``: ``compile_model(model, calib.npz, out, CompileConfig(...), unfused_path=...)`` with ``wbits`` and
  ``cwac`` = ``plain`` (``--no-cwac``), ``auto``, ``global``, ``local`` (segment-cached staged fit, compile's
  default) or ``prefix`` (global target, fitted by the reference ``prefix_staged_fit`` that re-runs the
  whole prefix per stage, then gated and folded exactly as compile does).
RESULT: compile wall seconds (the call only, not the imports), peak RSS of the whole process
(``VmHWM`` of /proc/self/status), and what compile reported.  ``gains``: the fitted gains per layer,
saved beside the model (``OUT.gains.npz``) so the parent can compare fit protocols.
"""
from __future__ import annotations

import json
import logging
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _ours(spec: dict) -> dict:
    from qwt2_onnx import CompileConfig, QuantConfig, compile_model
    from qwt2_onnx.config import CwacConfig

    protocol = spec["cwac"]
    if protocol == "plain":
        cwac = CwacConfig(enabled=False)
    else:
        cwac = CwacConfig(target="global" if protocol == "prefix" else protocol,
                          protocol="prefix" if protocol == "prefix" else "staged")
    cfg = CompileConfig(quant=QuantConfig(target="ort", wbits=spec["wbits"]), cwac=cwac, holdout_samples=0)
    t0 = time.perf_counter()
    res = compile_model(spec["model"], spec["calib"], spec["out"], cfg, unfused_path=spec.get("unfused"))
    wall = time.perf_counter() - t0
    row = {"compile_s": wall, "stage_s": res.seconds, "layers": len(res.plan.layers),
           "integer_kernels": len(res.fusion.integer) if res.fusion else None,
           "fusion": res.fusion.summary() if res.fusion else None}
    if res.cwac is not None:
        row["cwac"] = res.cwac.summary(len(res.plan.layers))
        row["fold_check"] = res.fold_check.summary() if res.fold_check is not None else None
        row["inserted_ops"] = res.stages.fold.inserted_ops
        np.savez(spec["out"] + ".gains.npz", **{k: c.gain for k, c in res.cwac.compensations.items()})
    return row


def _ort(spec: dict) -> dict:
    from zoo_ort_baseline import _quiet, ort_quantize

    _quiet()
    feeds = dict(np.load(spec["calib"]))
    t0 = time.perf_counter()
    ort_quantize(spec["model"], feeds, spec["out"], **spec["options"])
    return {"compile_s": time.perf_counter() - t0}


def peak_rss_mb() -> float:
    """This process's peak resident set since exec (VmHWM).  ``ru_maxrss`` is not used on Linux: it keeps the
    parent's peak across fork+exec, so every child would report at least the benchmark process's RSS."""
    try:
        line = next(s for s in Path("/proc/self/status").read_text().splitlines() if s.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    logging.basicConfig(level=logging.WARNING)
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    row = _ours(spec) if spec["kind"] == "ours" else _ort(spec)
    row["peak_rss_mb"] = peak_rss_mb()
    Path(argv[1]).write_text(json.dumps(row, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
