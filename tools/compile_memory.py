"""Where a compile's memory goes, and what the batch output limit buys: peak RSS per pipeline stage.

    python tools/compile_memory.py [names...] [--limit-mib 0 256 64] [--repeat 3] [--no-cwac]
                                   [--out docs/COMPILE_MEMORY.md]

For each zoo model and each value of ``runtime.BATCH_OUTPUT_LIMIT`` (the bytes of
fetched tensors one batch may hold; 0 here means no limit, i.e. always
``--batch-size 8`` as before the limit existed), a fresh process compiles the
model on its task's 64 calibration samples (as tools/zoo_eval.py does) while a
thread samples its resident set every 10 ms; each sample is attributed to the
pipeline stage running at the time (the ``on_stage`` hook of ``compile_model``).  The process reports
its VmHWM and, per stage, the seconds and the peak rise over the RSS when the
stage began.  Medians over ``--repeat`` processes; ratios are what to read on a
shared machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE / 2**20


def hwm_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


class StageMemory:
    """Peak RSS rise per stage, sampled by a daemon thread."""

    def __init__(self, period_s: float = 0.01):
        self.period_s, self.stage, self.start, self.peak = period_s, None, {}, {}
        self._stop = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            stage = self.stage  # read once: the compile thread changes it
            if stage is not None:
                self.peak[stage] = max(self.peak.get(stage, 0.0), rss_mb())
            time.sleep(self.period_s)

    def enter(self, name: str | None) -> None:
        if name is not None:
            self.start.setdefault(name, rss_mb())
        self.stage = name

    def stop(self) -> dict[str, float]:
        self._stop.set()
        return {k: self.peak[k] - self.start[k] for k in self.peak}


def child(name: str, limit_mib: int, cwac: bool) -> dict:
    from qwt2_onnx import CompileConfig, compile_model, runtime
    from qwt2_onnx.config import CwacConfig
    from zoo import fetch_model
    from zoo_tasks import TASKS

    runtime.BATCH_OUTPUT_LIMIT = limit_mib * 2**20 if limit_mib else 2**62
    model = fetch_model(name)
    feeds = TASKS[name].calib_feeds(model, 64)
    calib = [{k: v[i:i + 1] for k, v in feeds.items()} for i in range(64)]
    del feeds
    mem = StageMemory()
    with tempfile.TemporaryDirectory() as d:
        res = compile_model(model, calib, Path(d) / "out.onnx", CompileConfig(cwac=CwacConfig(enabled=cwac)),
                            measure=False, on_stage=mem.enter)
    rise = mem.stop()
    return {"hwm_mb": hwm_mb(), "seconds": res.seconds, "rise_mb": rise, "total_s": sum(res.seconds.values())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", default=["ppocr_det", "yolov8n", "orientation", "ppocr_rec", "ppocr_cls"])
    ap.add_argument("--limit-mib", type=int, nargs="+", default=[0, 256, 64])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-cwac", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("docs/COMPILE_MEMORY.md"))
    ap.add_argument("--child", nargs=2, metavar=("NAME", "LIMIT_MIB"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), not args.no_cwac)))
        return 0
    rows = []
    for name in args.names:
        for limit in args.limit_mib:
            runs = []
            for _ in range(args.repeat):
                cmd = [sys.executable, __file__, "--child", name, str(limit)] + (["--no-cwac"] if args.no_cwac else [])
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode:
                    raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
                runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            med = lambda f: statistics.median(f(r) for r in runs)  # noqa: E731
            stages = [s for s in runs[0]["seconds"] if s in runs[0]["rise_mb"]]
            row = {"model": name, "limit_mib": limit, "hwm_mb": med(lambda r: r["hwm_mb"]),
                   "total_s": med(lambda r: r["total_s"]),
                   "stages": {s: (med(lambda r: r["seconds"][s]), med(lambda r: r["rise_mb"].get(s, 0.0)))
                              for s in stages}}
            print(json.dumps(row), flush=True)
            rows.append(row)
    args.out.write_text(render(rows, args))
    print(args.out.read_text())
    return 0


def render(rows: list[dict], args) -> str:
    heavy = ["calibrate", "cwac_fit", "fold", "check"]
    limits = " ".join(map(str, args.limit_mib))
    lines = ["# Compile memory: peak RSS per stage vs the batch output limit", "",
             f"Generated by `python tools/compile_memory.py {' '.join(args.names)} --limit-mib {limits} "
             f"--repeat {args.repeat}{' --no-cwac' if args.no_cwac else ''}` ({platform.machine()}, Python "
             f"{platform.python_version()}, 2 cores, shared machine).",
             "Each cell: median of the fresh processes.  *limit*: `runtime.BATCH_OUTPUT_LIMIT`, the bytes of fetched "
             "tensors one batch may hold (`--batch-size 8` is the most; 0 = no limit, every batch 8 samples).  "
             "*rise*: the stage's peak RSS minus the RSS when it began.", "",
             "| model | limit (MiB) | peak RSS (MB) | compile (s) | "
             + " | ".join(f"{s} s / rise MB" for s in heavy) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(heavy)]
    for r in rows:
        cells = [f"{r['stages'][s][0]:.1f} / {r['stages'][s][1]:.0f}" if s in r["stages"] else "–" for s in heavy]
        lines.append(f"| {r['model']} | {r['limit_mib'] or 'none'} | {r['hwm_mb']:.0f} | {r['total_s']:.1f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
