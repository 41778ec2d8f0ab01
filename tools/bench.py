"""The benchmark: float vs onnxruntime quantize_static vs qwt2-onnx (plain PTQ, CWAC per target and fit protocol)
on every zoo model, same calibration and evaluation data; writes docs/BENCHMARKS.md from a resumable JSON.

    tools/bench                      # full run (long), resumes from docs/bench_results.json
    tools/bench --quick --out-dir D  # CI smoke: one small model, few samples, seconds of latency
    tools/bench --render-only        # regenerate the markdown and plots from the JSON

Per model (in this order, so a partial run holds the headline cells first):
1. float metrics; onnxruntime ``quantize_static`` defaults and best config (W8A8; W4A8 = same with
   ``weight_type=QInt4``); ours ``--no-cwac`` and CWAC ``auto`` (with ``--emit-unfused``) at W8A8 and W4A8;
   each compile in a fresh process (tools/bench_child.py: wall time, peak RSS of the whole process);
   the task metric and output SQNR / cosine per output part, deployed (onnxruntime, all optimizations).
2. latency: float, onnxruntime's PTQ, ours plain, fused and unfused (and plain twice: the A/A noise floor)
   round-robin in one process, 1 thread each, after warm-up; medians and paired per-iteration ratios.
3. CWAC ``global`` and ``local`` targets; 4. calibration-set scaling on one model; 5. the prefix reference fit.
Every finished cell is written to the JSON at once; a rerun skips it (``--redo`` recomputes).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))

from bench_latency import measure_latency  # noqa: E402
from zoo import fetch_model  # noqa: E402
from zoo_ort_baseline import _CachedSession, config_options  # noqa: E402
from zoo_tasks import TASKS  # noqa: E402

MODELS = ["ppocr_cls", "orientation", "ppocr_rec", "yolov8n", "ppocr_det"]   # small to large
BITS = {"w8a8": 8, "w4a8": 4}
# --quick: evaluation sets as small as tests/test_zoo_e2e.py uses.
QUICK_EVAL = {"ppocr_rec": {"n_en": 30, "n_zh": 0, "n_zh_rare": 0}, "ppocr_cls": {"n_eval": 60},
              "orientation": {"n_per_angle": 8}, "ppocr_det": {"n_pages": 4, "n_photos": 2}, "yolov8n": {"n_eval": 24}}
PHASES = ["core", "latency", "targets", "scaling", "prefix"]
# Output parts measured separately (name -> (output, axis, start, stop)); others: each whole output.
PARTS = {"yolov8n": {"boxes": ("output0", 1, 0, 4), "scores": ("output0", 1, 4, None)}}


def variant_spec(model: str, vid: str) -> dict:
    """``ort-defaults-w8a8``, ``ort-best-w4a8``, ``ours-<plain|auto|global|local|prefix>-<bits>``."""
    kind, what, bits = vid.split("-")
    if kind == "ort":
        options = dict(config_options(model, "best" if what == "best" else "defaults"))
        if bits == "w4a8":
            options["weight_type"] = "QInt4"
        return {"kind": "ort", "options": options, "bits": bits}
    return {"kind": "ours", "cwac": what, "wbits": BITS[bits], "bits": bits}


def phase_variants(phase: str, prefix: bool) -> list[str]:
    if phase == "core":
        return [f"{k}-{b}" for b in BITS for k in ("ort-defaults", "ort-best", "ours-plain", "ours-auto")]
    if phase == "targets":
        return [f"ours-{t}-{b}" for b in BITS for t in ("global", "local")]
    return [f"ours-prefix-{b}" for b in BITS] if prefix else []


class Bench:
    def __init__(self, args):
        self.args, self.json_path = args, args.out_dir / "bench_results.json"
        self.res = json.loads(self.json_path.read_text()) if self.json_path.exists() else {}
        self.res.setdefault("models", {})
        self.work, self._tasks = args.work, {}
        self.work.mkdir(parents=True, exist_ok=True)

    def save(self) -> None:
        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.json_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.res, indent=1, sort_keys=True, default=float) + "\n")
        tmp.replace(self.json_path)

    def log(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    # -- data ------------------------------------------------------------------------------------------
    def task(self, model: str):
        """The zoo task; with --quick a smaller evaluation set (the pipeline is checked, not the metric)."""
        if not self.args.quick:
            return TASKS[model]
        if model not in self._tasks:
            self._tasks[model] = type(TASKS[model])(**QUICK_EVAL[model])
        return self._tasks[model]

    def calib(self, model: str, n: int) -> Path:
        path = self.work / f"{model}.calib{n}.npz"
        if not path.exists():
            np.savez(path, **self.task(model).calib_feeds(fetch_model(model), n))
        return path

    def entry(self, model: str) -> dict:
        e = self.res["models"].setdefault(model, {"variants": {}})
        if "info" not in e:
            import onnx
            path = fetch_model(model)
            m = onnx.load(str(path))
            e["info"] = {"file": path.name, "size_mb": path.stat().st_size / 2**20,
                         "params": n_params(m),
                         "nodes": len(m.graph.node)}
        return e

    # -- one variant -----------------------------------------------------------------------------------
    def model_path(self, model: str, vid: str) -> Path:
        return self.work / f"{model}.{vid}.n{self.args.n_calib}.onnx"

    def compile(self, model: str, vid: str, n: int, out: Path, unfused: Path | None = None) -> dict:
        spec = {**variant_spec(model, vid), "model": str(fetch_model(model)), "calib": str(self.calib(model, n)),
                "out": str(out), "unfused": str(unfused) if unfused else None}
        with tempfile.TemporaryDirectory() as d:
            sp, rp = Path(d) / "spec.json", Path(d) / "res.json"
            sp.write_text(json.dumps(spec))
            t0 = time.perf_counter()
            try:
                p = subprocess.run([sys.executable, str(TOOLS / "bench_child.py"), str(sp), str(rp)],
                                   capture_output=True, text=True, timeout=self.args.timeout)
            except subprocess.TimeoutExpired:
                return {"error": f"timeout after {self.args.timeout:.0f}s", "options": spec.get("options")}
            if p.returncode != 0 or not rp.exists():
                return {"error": (p.stderr or p.stdout)[-800:], "options": spec.get("options")}
            row = json.loads(rp.read_text())
        row["process_s"] = time.perf_counter() - t0
        if spec["kind"] == "ort":
            row["options"] = {"quant_format": "QDQ", "per_channel": True, **spec["options"]}
        row["size_mb"] = out.stat().st_size / 2**20
        return row

    def evaluate(self, model: str, path: Path, fsess) -> dict:
        from zoo_eval import session
        ms = PartSession(session(str(path), True), fsess, PARTS.get(model, {}))
        metrics = self.task(model).evaluate(ms, fsess)
        return {"metrics": metrics, "fidelity": ms.summary()}

    def variant(self, model: str, vid: str, fsess) -> None:
        e = self.entry(model)
        if vid in e["variants"] and "error" not in e["variants"][vid] and not self.args.redo:
            return
        out = self.model_path(model, vid)
        unfused = out.with_suffix(".unfused.onnx") if vid.startswith("ours-auto") else None
        self.log(f"{model} {vid}: compiling")
        row = self.compile(model, vid, self.args.n_calib, out, unfused)
        if "error" not in row:
            row.update(self.evaluate(model, out, fsess))
            row["op_histogram"] = op_histogram(out)
            row["weight_types"] = weight_types(out)
        e["variants"][vid] = row
        self.save()
        self.log(f"{model} {vid}: " + (row.get("error", "")[-300:] or
                 f"{row['compile_s']:.1f}s {row['peak_rss_mb']:.0f}MB {row['metrics']}"))

    # -- phases ----------------------------------------------------------------------------------------
    def float_session(self, model: str):
        from zoo_eval import session
        e = self.entry(model)
        fsess = _CachedSession(session(str(fetch_model(model)), True))
        if "float" not in e:
            e["float"] = {"metrics": self.task(model).evaluate(fsess, fsess)}
            self.save()
            self.log(f"{model} float: {e['float']['metrics']}")
        return fsess

    def run_variants(self, model: str, vids: list[str]) -> None:
        todo = [v for v in vids if self.args.redo or v not in self.entry(model)["variants"]
                or "error" in self.entry(model)["variants"][v]]
        if not todo and "float" in self.entry(model):
            return
        fsess = self.float_session(model)
        for vid in todo:
            self.variant(model, vid, fsess)

    def latency(self, model: str) -> None:
        e = self.entry(model)
        if "latency" in e and not (self.args.redo or self.args.redo_latency):
            return
        groups = {}
        for bits in BITS:
            vids = {"ort_defaults": f"ort-defaults-{bits}", "ort_best": f"ort-best-{bits}",
                    "plain": f"ours-plain-{bits}", "fused": f"ours-auto-{bits}"}
            paths = {k: self.model_path(model, v) for k, v in vids.items()}
            paths["unfused"] = paths["fused"].with_suffix(".unfused.onnx")
            if all(p.exists() for p in paths.values()):
                groups[bits] = paths
        if not groups:
            return
        self.log(f"{model} latency ({', '.join(groups)})")
        feed = {k: v[:1] for k, v in np.load(self.calib(model, self.args.n_calib)).items()}
        e["latency"] = measure_latency(str(fetch_model(model)), groups, feed, self.args.latency_s)
        self.save()

    def scaling(self) -> None:
        model = self.args.scaling_model
        sc = self.res.setdefault("scaling", {}).setdefault(model, {})
        for n in self.args.scaling_n:
            for vid in ("ours-auto-w8a8", "ours-plain-w8a8", "ort-defaults-w8a8"):
                key = f"{vid}:{n}"
                if key in sc and "error" not in sc[key] and not self.args.redo:
                    continue
                self.log(f"scaling {model} {vid} n={n}")
                out = self.work / f"{model}.scaling.{vid}.n{n}.onnx"
                sc[key] = {"n": n, "variant": vid, **self.compile(model, vid, n, out)}
                self.save()
                if n != self.args.n_calib:
                    self.calib(model, n).unlink()   # up to 3 GB for the big models

    def prefix_gains(self, model: str) -> None:
        """Compare the gains of the two fit protocols (global target) layer by layer."""
        e = self.entry(model)
        for bits in BITS:
            a, b = (Path(f"{self.model_path(model, f'ours-{p}-{bits}')}.gains.npz") for p in ("global", "prefix"))
            if a.exists() and b.exists():
                ga, gb = dict(np.load(a)), dict(np.load(b))
                common = set(ga) & set(gb)
                e.setdefault("protocols", {})[bits] = {
                    "segment_layers": len(ga), "prefix_layers": len(gb), "common_layers": len(common),
                    "max_gain_diff": max((float(np.max(np.abs(ga[k] - gb[k]))) for k in common), default=0.0)}
        self.save()

    def annotate(self) -> None:
        """Fill fields added after a cell was computed (from the kept model files)."""
        for model, e in self.res["models"].items():
            for vid, r in e.get("variants", {}).items():
                path = self.model_path(model, vid)
                if "error" in r or not path.exists():
                    continue
                if "weight_types" not in r:
                    r["weight_types"] = weight_types(path)
                if "deployed_ops" not in r and vid.endswith("w8a8") and vid.split("-")[1] in ("defaults", "best",
                                                                                           "plain", "auto"):
                    r["deployed_ops"] = deployed_ops(path)
        self.save()

    def run(self) -> None:
        models = self.args.models
        meta, prev = machine_info(self.args), self.res.get("meta", {})
        if prev and not self.args.redo:     # a resumed run: keep when it started, list every invocation
            meta["started"] = prev.get("started", meta["started"])
            meta["invocations"] = prev.get("invocations", [prev.get("command")]) + [meta["command"]]
        self.res["meta"] = meta
        self.save()
        ph = self.args.phases
        for model in models:
            if "core" in ph:
                self.run_variants(model, phase_variants("core", False))
            if "latency" in ph:
                self.latency(model)
        for model in models if "targets" in ph else []:
            self.run_variants(model, phase_variants("targets", False))
        if self.args.scaling_n and "scaling" in ph:
            self.scaling()
        for model in [m for m in models if m not in self.args.no_prefix_for and "prefix" in ph]:
            self.run_variants(model, phase_variants("prefix", True))
            self.prefix_gains(model)
        self.annotate()
        self.res["meta"]["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        self.save()


class PartSession:
    """``zoo_eval.MeasuredSession`` plus SQNR / cosine per output part (``PARTS``)."""

    def __init__(self, sess, fsess, parts: dict):
        from qwt2_onnx.diffstats import DiffAccumulator
        from zoo_eval import MeasuredSession

        self._ms, self._float, self._parts = MeasuredSession(sess, fsess), fsess, parts
        self.part_stats = {p: DiffAccumulator(p) for p in parts}

    def __getattr__(self, attr):
        return getattr(self._ms, attr)

    def run(self, names, feed, *args):
        out = self._ms.run(names, feed, *args)
        names = names or [o.name for o in self._ms.get_outputs()]
        got = dict(zip(names, out))
        ref = dict(zip(names, self._float.run(names, feed))) if self._parts else {}
        for p, (o, axis, lo, hi) in self._parts.items():
            if o in got:
                sl = [slice(None)] * got[o].ndim
                sl[axis] = slice(lo, hi)
                self.part_stats[p].update(ref[o][tuple(sl)], got[o][tuple(sl)])
        return out

    def summary(self) -> dict:
        whole = self._ms.summary()
        return {**whole, **{p: s.result().brief() for p, s in self.part_stats.items() if s.n}}


def n_params(m) -> int:
    """Weights held as initializers or Constant nodes (the Paddle exports keep theirs in Constants)."""
    consts = [a.t for n in m.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    return int(sum(np.prod(t.dims) for t in list(m.graph.initializer) + consts))


def weight_types(path: Path) -> dict:
    """Element types of the initializers that feed a DequantizeLinear (did INT4 weights really come out?)."""
    import onnx
    m = onnx.load(str(path))
    dq_in = {n.input[0] for n in m.graph.node if n.op_type == "DequantizeLinear"}
    return dict(Counter(onnx.TensorProto.DataType.Name(t.data_type) for t in m.graph.initializer if t.name in dq_in))


def deployed_ops(path: Path) -> dict:
    """Op histogram of the graph onnxruntime actually runs (all optimizations: QDQ fused to integer kernels)."""
    import onnx
    from qwt2_onnx.inspect_ort import optimized_graph
    return dict(Counter(n.op_type for n in optimized_graph(onnx.load(str(path))).graph.node))


def op_histogram(path: Path) -> dict:
    import onnx
    return dict(Counter(n.op_type for n in onnx.load(str(path)).graph.node))


def machine_info(args) -> dict:
    import onnx
    import onnxruntime as ort
    flags = set()
    try:
        flags = set(next(s for s in Path("/proc/cpuinfo").read_text().splitlines() if s.startswith("flags"))
                    .split(":", 1)[1].split())
    except (OSError, StopIteration):
        pass
    cpu = next((s.split(":", 1)[1].strip() for s in Path("/proc/cpuinfo").read_text().splitlines()
                if s.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else "?"
    # QWT2_BENCH_COMMIT: the commit of a `git archive` snapshot the run was started from (no .git there)
    commit = os.environ.get("QWT2_BENCH_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=TOOLS.parent).stdout.strip()
    prev = {}
    return {**prev, "cpu": cpu, "cores": os.cpu_count(), "machine": platform.machine(),
            "isa": sorted(f for f in flags if f.startswith(("avx", "amx")) or "vnni" in f or f == "fma"),
            "python": platform.python_version(), "onnxruntime": ort.__version__, "onnx": onnx.__version__,
            "numpy": np.__version__, "commit": commit, "quick": args.quick, "n_calib": args.n_calib,
            "models": args.models, "latency_s": args.latency_s, "scaling_model": args.scaling_model,
            "scaling_n": args.scaling_n, "command": "tools/bench " + " ".join(map(_portable, args.argv)),
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "loadavg_start": os.getloadavg(), "note": os.environ.get("QWT2_BENCH_NOTE", "")}


def _portable(arg: str) -> str:
    """A command-line argument as the document records it: paths inside the repository relative to it,
    paths in the home directory under ~ (no path of the machine the run happened on)."""
    for root, shown in ((TOOLS.parent, ""), (Path.home(), "~/")):
        if arg.startswith(str(root) + os.sep):
            return shown + arg[len(str(root)) + 1:]
    return arg


def parse(argv: list[str] | None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CI smoke: ppocr_cls, 8 samples, small eval set, 2 s of latency")
    ap.add_argument("--models", nargs="+", choices=MODELS)
    ap.add_argument("--n-calib", type=int)
    ap.add_argument("--out-dir", type=Path, default=TOOLS.parent / "docs")
    ap.add_argument("--work", type=Path, help="compiled models and calibration .npz (kept for resuming)")
    ap.add_argument("--latency-s", type=float, help="seconds of timed round-robin per model")
    ap.add_argument("--scaling-model", default="ppocr_cls")
    ap.add_argument("--scaling-n", type=int, nargs="*")
    ap.add_argument("--no-prefix-for", nargs="*", default=[], help="skip the prefix reference fit on these")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per compile")
    ap.add_argument("--phases", nargs="+", default=PHASES, choices=PHASES, help="run only these phases")
    ap.add_argument("--redo", action="store_true", help="recompute cells already in the JSON")
    ap.add_argument("--redo-latency", action="store_true", help="measure latency again")
    ap.add_argument("--render-only", action="store_true")
    args = ap.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    q = args.quick
    args.models = args.models or (["ppocr_cls"] if q else MODELS)
    args.n_calib = args.n_calib or (8 if q else 64)
    args.latency_s = args.latency_s if args.latency_s is not None else (2.0 if q else 60.0)
    args.scaling_n = args.scaling_n if args.scaling_n is not None else ([4, 8] if q else [32, 128, 512, 1024])
    args.work = args.work or (args.out_dir / "bench_work" if q else Path.home() / ".cache/qwt2-onnx/bench")
    return args


def main(argv: list[str] | None = None) -> int:
    from bench_render import render

    args = parse(argv)
    if not args.render_only:
        Bench(args).run()
    res = json.loads((args.out_dir / "bench_results.json").read_text())
    render(res, args.out_dir)
    print(f"wrote {args.out_dir / 'BENCHMARKS.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
