"""Where a compile's memory goes: peak RSS per pipeline stage.

    python tools/compile_memory.py ppocr_det [--no-cwac] [--batch-size 8] [--n-calib 64]

Compiles a zoo model on its task's calibration samples (as tools/zoo_eval.py
does) while a thread samples this process's resident set every 10 ms; each
sample is attributed to the pipeline stage running at the time
(``pipeline._stage``).  Prints one line per stage: seconds, peak RSS during the
stage and its rise over the RSS when the stage began, and the process's VmHWM.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from qwt2_onnx import CalibConfig, CompileConfig, compile_model, pipeline  # noqa: E402
from qwt2_onnx.config import CwacConfig  # noqa: E402
from zoo import fetch_model  # noqa: E402
from zoo_tasks import TASKS  # noqa: E402

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE / 2**20


def hwm_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


class StageMemory:
    """Peak RSS per stage, sampled by a daemon thread."""

    def __init__(self, period_s: float = 0.01):
        self.period_s, self.stage, self.rows = period_s, "setup", {}
        self._start = {"setup": rss_mb()}
        self._stop = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            r = rss_mb()
            self.rows[self.stage] = max(self.rows.get(self.stage, 0.0), r)
            time.sleep(self.period_s)

    def enter(self, name: str) -> None:
        self.stage = name
        self._start.setdefault(name, rss_mb())

    def stop(self) -> None:
        self._stop.set()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", choices=sorted(TASKS))
    ap.add_argument("--no-cwac", action="store_true")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--n-calib", type=int, default=64)
    args = ap.parse_args(argv)
    model = fetch_model(args.name)
    feeds = TASKS[args.name].calib_feeds(model, args.n_calib)
    calib = [{k: v[i:i + 1] for k, v in feeds.items()} for i in range(args.n_calib)]
    del feeds
    mem = StageMemory()
    real_stage = pipeline._stage

    @contextlib.contextmanager
    def stage(name, seconds):
        mem.enter(name)
        try:
            with real_stage(name, seconds):
                yield
        finally:
            mem.enter("between stages")

    pipeline._stage = stage
    cfg = CompileConfig(calib=CalibConfig(batch_size=args.batch_size), cwac=CwacConfig(enabled=not args.no_cwac))
    with tempfile.TemporaryDirectory() as d:
        res = compile_model(model, calib, Path(d) / "out.onnx", cfg, measure=False)
    mem.stop()
    seconds = res.seconds
    print(f"{args.name} batch {args.batch_size} {'--no-cwac' if args.no_cwac else 'CWAC'}: VmHWM {hwm_mb():.0f} MB")
    print(f"{'stage':<28} {'s':>7} {'RSS at start':>13} {'peak RSS':>9} {'rise':>7}")
    for name, peak in mem.rows.items():
        start = mem._start.get(name, float("nan"))
        print(f"{name:<28} {seconds.get(name, float('nan')):>7.1f} {start:>13.0f} {peak:>9.0f} {peak - start:>7.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
