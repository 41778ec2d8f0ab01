"""``qwt2-onnx bench``: this compiler against onnxruntime's own quantizer, on *your* model and data.

    qwt2-onnx bench MODEL --calib DATA [--eval DATA] [--task MODULE:NAME] [-o DIR]

Three compiles of MODEL on the same calibration samples, each in its own process (wall time including
start-up, as a user feels it; peak RSS of that process from the kernel's accounting):

* ``ort``: onnxruntime ``quantize_static`` with its recommended recipe — ``quant_pre_process``, then QDQ,
  per-channel weights, MinMax ranges, u8 activations, s8 weights;
* ``plain``: ``qwt2-onnx compile --no-cwac``;
* ``cwac``: ``qwt2-onnx compile`` (the default: CWAC fitted, folded and checked).

Each written model then runs deployed (onnxruntime, all optimizations) on the evaluation samples (default:
the calibration samples) beside the float model: SQNR and cosine per graph output, and, with ``--task``, a
task metric — ``NAME`` in ``MODULE`` (a module name or a ``.py`` path) is an object or a class with
``evaluate(session, float_session) -> {metric: value}`` (``tools/zoo_tasks.py``'s ``Task`` interface).
Latency: every model round-robin on one sample, one thread, median over ``--latency-runs`` runs, as a
ratio to float's.  The table goes to the terminal and, with ``-o DIR``, to ``DIR/bench.md`` and
``DIR/bench.json`` (written together, nothing else).
"""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .calib_data import CalibrationSet, InputSpec, open_calibration
from .diffstats import DiffAccumulator
from .errors import QwtError
from .model_io import AtomicOutputs, load_model
from .plugins import load_object
from .run_paths import Access, check_run_paths, data_files, model_files
from .runtime import make_session

VARIANTS = ("ort", "plain", "cwac")
LABELS = {"float": "float", "ort": "onnxruntime quantize_static", "plain": "qwt2-onnx --no-cwac",
          "cwac": "qwt2-onnx (CWAC)"}


@dataclasses.dataclass(frozen=True)
class Row:
    """One compiled model: how it was made and how close it runs to float."""

    variant: str
    ok: bool
    seconds: float  # wall time of the compile process
    peak_rss_mib: float  # of the compile process
    error: str = ""  # the last lines of its stderr when it failed
    fidelity: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)  # output -> sqnr_db, cosine
    task: dict[str, float] = dataclasses.field(default_factory=dict)
    latency_ratio: float | None = None  # median deployed latency / float's


@dataclasses.dataclass(frozen=True)
class BenchReport:
    model: str
    calib_samples: int
    eval_samples: int
    float_task: dict[str, float]
    float_latency_ms: float | None
    rows: list[Row]

    def markdown(self) -> str:
        ort = next((r for r in self.rows if r.variant == "ort" and r.ok), None)
        lines = [f"# qwt2-onnx bench: {self.model}", "",
                 f"{self.calib_samples} calibration samples, {self.eval_samples} evaluation samples; each compile "
                 "in its own process; fidelity and latency deployed on onnxruntime (CPU, all optimizations).", "",
                 "| model | compile s | × ort | peak RSS MiB | × ort | mean SQNR dB | min cosine | latency / float |"
                 + "".join(f" {k} |" for k in self.float_task),
                 "|---|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(self.float_task),
                 "| float | – | – | – | – | – | – | 1.00 |" + "".join(f" {v:.4g} |" for v in self.float_task.values())]
        for r in self.rows:
            if not r.ok:
                lines.append(f"| {LABELS[r.variant]} | failed: {r.error.splitlines()[-1] if r.error else '?'} |")
                continue
            sq = [v["sqnr_db"] for v in r.fidelity.values()]
            cos = [v["cosine"] for v in r.fidelity.values()]
            t_ratio = f"{r.seconds / ort.seconds:.2f}" if ort else "–"
            m_ratio = f"{r.peak_rss_mib / ort.peak_rss_mib:.2f}" if ort else "–"
            lat = f"{r.latency_ratio:.2f}" if r.latency_ratio is not None else "–"
            lines.append(f"| {LABELS[r.variant]} | {r.seconds:.1f} | {t_ratio} | {r.peak_rss_mib:.0f} | {m_ratio} | "
                         f"{statistics.fmean(sq):.2f} | {min(cos):.5f} | {lat} |"
                         + "".join(f" {r.task.get(k, float('nan')):.4g} |" for k in self.float_task))
        return "\n".join(lines) + "\n"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)


def load_task(spec: str):
    """``MODULE:NAME`` (a module name or a path to a .py file) -> an object with ``evaluate``; a class is
    instantiated without arguments."""
    task = load_object(spec, "the task", "my_tasks.py:Detection")
    task = task() if isinstance(task, type) else task
    if not callable(getattr(task, "evaluate", None)):
        raise QwtError(f"the task {spec!r} has no evaluate(session, float_session) method",
                       fix="see tools/zoo_tasks.py's Task interface")
    return task


def run_bench(model: str | Path, calib: str | Path, *, eval_data: str | Path | None = None, task=None,
              out_dir: str | Path | None = None, latency_runs: int = 30, extra_args: tuple[str, ...] = ()
              ) -> BenchReport:
    """The comparison of the module doc; ``extra_args``: options passed to both of our compiles."""
    model, calib = Path(model), Path(calib)
    reads = model_files(model, "input model") + data_files(calib, "calibration data")
    if eval_data is not None:
        reads += data_files(Path(eval_data), "evaluation data")
    if out_dir is not None:
        out_dir = Path(out_dir)
        if out_dir.exists() and not out_dir.is_dir():
            raise QwtError(f"-o {out_dir} is not a folder", fix="pass a folder (it is created if missing)")
        writes = [Access(out_dir / "bench.md", "bench table"), Access(out_dir / "bench.json", "bench JSON")]
        check_run_paths(reads, writes if out_dir.is_dir() else [Access(out_dir, "bench folder")])
    specs = InputSpec.from_model(load_model(model))
    calib_set = open_calibration(calib, specs)
    calib_set.validate()
    eval_set = open_calibration(eval_data, specs) if eval_data is not None else calib_set
    if eval_data is not None:
        eval_set.validate()
    with tempfile.TemporaryDirectory(prefix="qwt2-bench-") as tmp:
        rows, paths = [], {}
        for variant in VARIANTS:
            out = Path(tmp) / f"{variant}.onnx"
            row = _compile(variant, model, calib, out, extra_args)
            rows.append(row)
            if row.ok:
                paths[variant] = out
        float_task, float_ms, rows = _measure(model, paths, rows, eval_set, task, latency_runs)
    report = BenchReport(model.name, _count(calib_set), _count(eval_set), float_task, float_ms, rows)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        with AtomicOutputs() as outputs:
            outputs.text(report.markdown(), out_dir / "bench.md")
            outputs.text(report.to_json(), out_dir / "bench.json")
            outputs.commit()
    return report


def _count(data: CalibrationSet) -> int:
    return data.length if data.length is not None else sum(1 for _ in data)


def _compile(variant: str, model: Path, calib: Path, out: Path, extra_args: tuple[str, ...]) -> Row:
    """One compile in its own process: wall seconds and that process's peak RSS (``os.wait4``)."""
    if variant == "ort":
        cmd = [sys.executable, "-m", "qwt2_onnx.bench", "--ort-child", str(model), str(calib), str(out)]
    else:
        cmd = [sys.executable, "-m", "qwt2_onnx", "compile", str(model), "--calib", str(calib), "-o", str(out),
               *(["--no-cwac"] if variant == "plain" else []), *extra_args]
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - t0
        err.seek(0)
        tail = err.read().decode(errors="replace").strip()[-2000:]
    ok = proc.returncode == 0 and out.is_file()
    return Row(variant, ok, round(seconds, 2), round(usage.ru_maxrss / 1024, 1), "" if ok else tail or f"exit {proc.returncode}")


def _measure(model: Path, paths: dict[str, Path], rows: list[Row], data: CalibrationSet, task, runs: int):
    """Fidelity (and the task metric) of each compiled model, deployed, and its latency ratio to float:
    (float's task metrics, float's median latency in ms, the rows)."""
    float_sess = make_session(str(model), optimized=True)
    names = [o.name for o in float_sess.get_outputs()]
    sessions = {v: make_session(str(p), optimized=True) for v, p in paths.items()}
    accs = {v: {n: DiffAccumulator(n) for n in names} for v in sessions}
    for feed in data:
        ref = float_sess.run(names, feed)
        for v, sess in sessions.items():
            for n, r, c in zip(names, ref, sess.run(names, feed)):
                accs[v][n].update(r, c)
    float_task = dict(task.evaluate(float_sess, float_sess)) if task is not None else {}
    latency = _latencies(model, paths, next(iter(data)), runs)
    out = []
    for r in rows:
        if r.variant not in sessions:
            out.append(r)
            continue
        fid = {n: {"sqnr_db": round(s.sqnr_db, 3), "cosine": round(s.cosine, 6)}
               for n, s in ((n, a.result()) for n, a in accs[r.variant].items())}
        metrics = dict(task.evaluate(sessions[r.variant], float_sess)) if task is not None else {}
        ratio = round(latency[r.variant] / latency["float"], 3) if latency else None
        out.append(dataclasses.replace(r, fidelity=fid, task=metrics, latency_ratio=ratio))
    return float_task, round(latency["float"] * 1e3, 3) if latency else None, out


def _latencies(model: Path, paths: dict[str, Path], feed: dict[str, np.ndarray], runs: int) -> dict[str, float]:
    """Median seconds of one run of float and of each model, round-robin, one thread each, after two warm-up
    rounds ({} when ``runs`` is 0)."""
    if runs <= 0:
        return {}
    sessions = {"float": make_session(str(model), optimized=True, threads=1)}
    sessions.update({v: make_session(str(p), optimized=True, threads=1) for v, p in paths.items()})
    times: dict[str, list[float]] = {v: [] for v in sessions}
    for i in range(runs + 2):
        for v, sess in sessions.items():
            t0 = time.perf_counter()
            sess.run(None, feed)
            if i >= 2:
                times[v].append(time.perf_counter() - t0)
    return {v: statistics.median(t) for v, t in times.items()}


def _ort_child(model: str, calib: str, out: str) -> None:
    """onnxruntime's recommended static recipe on our calibration samples (run in its own process)."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    specs = InputSpec.from_model(load_model(model))
    data = open_calibration(calib, specs)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.samples = iter(data)

        def get_next(self):
            return next(self.samples, None)

    pre = out + ".pre.onnx"
    m = load_model(model)
    if max((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), default=13) < 13:
        import onnx  # per-channel Q/DQ needs opset 13

        model = out + ".op13.onnx"
        onnx.save(onnx.version_converter.convert_version(m, 13), model)
    del m
    quant_pre_process(model, pre, skip_symbolic_shape=True)
    quantize_static(pre, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    for leftover in (pre, out + ".op13.onnx"):
        if os.path.exists(leftover):
            os.remove(leftover)


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "--ort-child":
    _ort_child(*sys.argv[2:])
