"""Before vs after a change: wall time, peak RSS and the written bytes of ``qwt2-onnx compile`` run from two
git revisions, one fresh process per run, the two alternated (A, B, A, B, ...) so that machine load falls on
both alike.  The gate and the measure of speed work: outputs must be byte-identical, times are medians.

    python tools/speed_ab.py --a 8e3e149 --b WORKTREE [--models ppocr_det,u2net_like] [--rounds 3]
                             [--json docs/speed_ab.json] [-- EXTRA COMPILE ARGS]

``--a`` / ``--b``: a git revision (exported with ``git archive`` into a temporary folder) or ``WORKTREE`` (this
checkout as it is).  Models: corpus models (``tools/corpus.py prepare``) or probe models
(``tools/probe_models.py``), each with its own calibration samples.  Printed: per model and side the median
wall seconds, the median peak RSS of the compile process (``wait4``), the median seconds of each pipeline
stage (the compile's ``time:`` line), and whether every run of both sides wrote the same model and report
(``tools/bitcheck.py``'s digests).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bitcheck import output_digests  # noqa: E402
from corpus import corpus_dir  # noqa: E402
from probe_models import PROBES, probe_dir  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def model_dir(name: str) -> Path:
    return probe_dir(name) if name in PROBES else corpus_dir() / "models" / name


def tree(rev: str, tmp: Path) -> Path:
    """A source tree of ``rev``: this checkout for WORKTREE, else the revision exported."""
    if rev == "WORKTREE":
        return ROOT
    dest = tmp / f"tree-{rev}"
    dest.mkdir()
    archive = subprocess.run(["git", "archive", rev], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def run_once(src: Path, model: str, out: Path, extra: list[str]) -> dict:
    d = model_dir(model)
    cmd = [sys.executable, "-m", "qwt2_onnx", "compile", str(d / "model.onnx"), "--calib", str(d / "calib.npz"),
           "-o", str(out), *extra]
    env = {**os.environ, "PYTHONPATH": str(src)}
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        log.seek(0)
        text = log.read().decode(errors="replace")
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        raise SystemExit(f"{model} from {src}: exit {rc}\n{text[-2000:]}")
    line = next((x for x in text.splitlines() if x.startswith("time:")), "")
    return {"wall": wall, "peak_mib": usage.ru_maxrss / 1024,
            "stages": {k: float(v) for k, v in re.findall(r"(\w+) ([\d.]+)s", line)}, **output_digests(out)}


def summary(runs: list[dict]) -> dict:
    stages = {k: statistics.median(r["stages"].get(k, 0.0) for r in runs) for k in runs[0]["stages"]}
    return {"wall": statistics.median(r["wall"] for r in runs), "peak_mib": statistics.median(r["peak_mib"] for r in runs),
            "stages": stages, "walls": [round(r["wall"], 1) for r in runs]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", required=True)
    ap.add_argument("--b", default="WORKTREE")
    ap.add_argument("--models", default="ppocr_det,u2net_like")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path)
    ap.add_argument("extra", nargs="*", help="extra compile arguments, after --")
    a = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="speed_ab.") as tmp_:
        tmp = Path(tmp_)
        srcs = {"a": tree(a.a, tmp), "b": tree(a.b, tmp)}
        for model in a.models.split(","):
            runs: dict[str, list[dict]] = {"a": [], "b": []}
            for i in range(a.rounds):
                for side in ("a", "b"):
                    runs[side].append(run_once(srcs[side], model, tmp / f"{model}.{side}{i}.onnx", a.extra))
                    print(f"{model} {side}{i}: {runs[side][-1]['wall']:.1f}s {runs[side][-1]['peak_mib']:.0f} MiB",
                          flush=True)
            identical = len({(r["model"], r["report"]) for side in runs.values() for r in side}) == 1
            results[model] = {"a": summary(runs["a"]), "b": summary(runs["b"]), "identical": identical}
    print(f"\n| model | wall {a.a} | wall {a.b} | ratio | peak {a.a} | peak {a.b} | identical |\n|---|---:|---:|---:|---:|---:|---|")
    for model, r in results.items():
        print(f"| {model} | {r['a']['wall']:.1f} s | {r['b']['wall']:.1f} s | {r['b']['wall'] / r['a']['wall']:.2f} | "
              f"{r['a']['peak_mib']:.0f} MiB | {r['b']['peak_mib']:.0f} MiB | {'yes' if r['identical'] else 'NO'} |")
    for model, r in results.items():
        print(f"{model} stages a: {r['a']['stages']}\n{model} stages b: {r['b']['stages']}")
    if a.json:
        a.json.write_text(json.dumps({"a": a.a, "b": a.b, "extra": a.extra, "rounds": a.rounds,
                                      "cpu": "AVX512-VNNI" if "avx512_vnni" in Path("/proc/cpuinfo").read_text() else "no VNNI",
                                      "results": results}, indent=1) + "\n")
    return 0 if all(r["identical"] for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
