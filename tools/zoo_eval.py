"""Task metrics of our compiled models on the zoo: float vs ours, simulated and deployed.

    python tools/zoo_eval.py [names...] [--variants w8a8-ort w8a8-trt w4a8-ort] [--n-calib 64]
                             [--json docs/zoo_results.json]

For each zoo model (tools/zoo.py) and variant, ``compile_model`` runs on the
task's ``n_calib`` calibration samples (the same samples tools/zoo_ort_baseline.py
gives onnxruntime's quantize_static), then the task metric (tools/zoo_tasks.py)
is measured twice: *simulated* (onnxruntime, graph optimizations off: every
Q/DQ runs in float) and *deployed* (all optimizations: integer kernels).
Results are merged into the JSON file (one entry per model and variant), which
tools/zoo_report.py renders into docs/ZOO.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import onnxruntime as ort  # noqa: E402

from collections import Counter  # noqa: E402

from qwt2_onnx import CalibConfig, CompileConfig, QuantConfig, compile_model  # noqa: E402
from qwt2_onnx.config import CwacConfig  # noqa: E402
from zoo import fetch_model  # noqa: E402
from zoo_tasks import TASKS  # noqa: E402

_QUANT = {
    "w8a8-ort": QuantConfig(target="ort", wbits=8),
    "w8a8-trt": QuantConfig(target="trt", wbits=8),
    "w4a8-ort": QuantConfig(target="ort", wbits=4),
}
# "<bits>-<target>": the default compile (CWAC on, target auto); "-plain": --no-cwac;
# "-global" / "-local": CWAC with that target only.
VARIANTS: dict[str, tuple[QuantConfig, CwacConfig]] = {}
for _k, _q in _QUANT.items():
    VARIANTS[_k] = (_q, CwacConfig())
    VARIANTS[f"{_k}-plain"] = (_q, CwacConfig(enabled=False))
    VARIANTS[f"{_k}-global"] = (_q, CwacConfig(target="global"))
    VARIANTS[f"{_k}-local"] = (_q, CwacConfig(target="local"))
DEFAULT_VARIANTS = [v for k in _QUANT for v in (k, f"{k}-plain")] + [
    f"{k}-{t}" for k in ("w8a8-ort", "w4a8-ort") for t in ("global", "local")]


def session(path: str, optimized: bool) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if not optimized:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


class MeasuredSession:
    """A session that also compares every output with the float session's on the same feed
    (output SQNR / cosine vs float over the task's evaluation inputs)."""

    def __init__(self, sess, float_sess):
        from qwt2_onnx.diffstats import DiffAccumulator

        self._sess, self._float = sess, float_sess
        self.stats = {o.name: DiffAccumulator(o.name) for o in sess.get_outputs()}

    def __getattr__(self, attr):
        return getattr(self._sess, attr)

    def run(self, names, feed, *args):
        out = self._sess.run(names, feed, *args)
        names = names or [o.name for o in self._sess.get_outputs()]
        for n, a, b in zip(names, self._float.run(names, feed), out):
            self.stats[n].update(a, b)
        return out

    def summary(self) -> dict:
        return {n: s.result().brief() for n, s in self.stats.items()}


def evaluate(task, path: str, fsess) -> tuple[dict, dict]:
    """(task metrics, output fidelity) simulated and deployed: {"simulated": ..., "deployed": ...} each."""
    metrics, fidelity = {}, {}
    for kind, optimized in (("simulated", False), ("deployed", True)):
        ms = MeasuredSession(session(path, optimized), fsess)
        metrics[kind] = task.evaluate(ms, fsess)
        fidelity[kind] = ms.summary()
    return metrics, fidelity


def evaluate_ours(name: str, variant: str, n_calib: int, workdir: Path, calib: CalibConfig = CalibConfig()) -> dict:
    """Compile zoo model ``name`` with ``variant`` and measure its task metric both ways."""
    task, model = TASKS[name], fetch_model(name)
    feeds = task.calib_feeds(model, n_calib)
    samples = [{k: v[i:i + 1] for k, v in feeds.items()} for i in range(n_calib)]
    out = workdir / f"{name}.{variant}.onnx"
    t0 = time.perf_counter()
    quant, cwac = VARIANTS[variant]
    res = compile_model(model, samples, out, CompileConfig(quant=quant, calib=calib, cwac=cwac, holdout_samples=0))
    compile_s = time.perf_counter() - t0
    fsess = session(str(model), True)
    ops = lambda m: Counter(n.op_type for n in m.graph.node)  # noqa: E731
    row = {"model": name, "variant": variant, "n_calib": n_calib, "compile_s": round(compile_s, 1),
           "layers": len(res.plan.layers), "float_layers": len(res.plan.skipped),
           "integer_kernels": len(res.fusion.integer), "fusion": res.fusion.summary(),
           "seconds": res.seconds, "op_histogram_equal_plain": ops(res.model) == ops(res.plain_model)}
    if res.cwac is not None:
        row["cwac"] = {**res.cwac.summary(len(res.plan.layers)), "fit_s": round(res.cwac.seconds, 1),
                       "fold_check": (res.fold_check.summary() if res.fold_check is not None else None),
                       "inserted_ops": res.stages.fold.inserted_ops,
                       "strategies": dict(Counter(res.stages.fold.strategies.values()))}
    metrics, row["output_fidelity"] = evaluate(task, str(out), fsess)
    row.update(metrics)
    return row


def float_metrics(name: str) -> dict:
    path = str(fetch_model(name))
    s = session(path, True)
    return TASKS[name].evaluate(s, s)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*")
    ap.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    ap.add_argument("--n-calib", type=int, default=64)
    ap.add_argument("--json", type=Path, default=Path("docs/zoo_results.json"))
    args = ap.parse_args(argv)
    results = json.loads(args.json.read_text()) if args.json.exists() else {}
    with tempfile.TemporaryDirectory() as d:
        for name in args.names or list(TASKS):
            entry = results.setdefault(name, {})
            entry["float"] = float_metrics(name)
            print(f"{name} float: {entry['float']}", flush=True)
            for variant in args.variants:
                row = evaluate_ours(name, variant, args.n_calib, Path(d))
                entry[f"ours-{variant}"] = row
                print(f"{name} ours-{variant}: sim {row['simulated']} | dep {row['deployed']} | {row['fusion']}",
                      flush=True)
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
