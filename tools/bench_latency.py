"""Deployed CPU latency for tools/bench.py: every session of one model timed round-robin in one process.

Sessions: the float model, and per bit width onnxruntime's PTQ (defaults, best config), ours plain
(``--no-cwac``), ours fused (CWAC folded), ours unfused (explicit Mul/Add) and ours plain a second time
(a separate session of the same file: the A/A comparison that shows the noise floor).  All with onnxruntime's
default graph optimizations (integer kernels), ``intra_op_num_threads=1``.  After warm-up, each iteration
runs every session once on the same input, in a freshly shuffled order (a fixed order would give each
session the same predecessor every time, whose cache footprint then biases it); absolute times on a shared
machine drift, so the numbers to read are *paired ratios*: per iteration, t(A)/t(B), and their median with a
bootstrap 95% interval of the median.
"""
from __future__ import annotations

import time
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort

from qwt2_onnx.inspect_ort import optimized_graph

# (numerator, denominator) session pairs reported per bit width; "float" is shared.
RATIOS = [("fused", "plain"), ("plain_aa", "plain"), ("fused", "unfused"), ("fused", "float"),
          ("plain", "float"), ("unfused", "float"), ("ort_defaults", "float"), ("ort_best", "float"),
          ("fused", "ort_best")]


def _session(path: str) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def _ratio(a: np.ndarray, b: np.ndarray, rng: np.random.Generator) -> dict:
    r = a / b
    boot = np.median(rng.choice(r, (1000, r.size)), axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"median": float(np.median(r)), "ci95": [float(lo), float(hi)], "p25_p75":
            [float(np.percentile(r, 25)), float(np.percentile(r, 75))]}


def _histograms(paths: dict[str, str]) -> dict:
    """Op histograms of the saved fused / plain / unfused models and of the graphs onnxruntime deploys."""
    out = {}
    for k in ("fused", "plain", "unfused"):
        m = onnx.load(paths[k])
        out[k] = {"saved": dict(Counter(n.op_type for n in m.graph.node)),
                  "deployed": dict(Counter(n.op_type for n in optimized_graph(m).graph.node))}
    return out


def measure_latency(float_path: str, groups: dict[str, dict], feed: dict, budget_s: float,
                    warmup: int = 5, min_iter: int = 15, max_iter: int = 2000) -> dict:
    """``groups``: bit width -> {"ort_defaults"|"ort_best"|"plain"|"fused"|"unfused": model path}."""
    paths = {"float": str(float_path)}
    for bits, g in groups.items():
        paths.update({f"{bits}:{k}": str(p) for k, p in g.items()})
        paths[f"{bits}:plain_aa"] = str(g["plain"])
    sessions = {k: _session(p) for k, p in paths.items()}
    keys = list(sessions)
    for _ in range(warmup):
        for k in keys:
            sessions[k].run(None, feed)
    times: dict[str, list[float]] = {k: [] for k in keys}
    t_end, it, order = time.perf_counter() + budget_s, 0, np.random.default_rng(1)
    while it < min_iter or (time.perf_counter() < t_end and it < max_iter):
        for k in order.permutation(keys):
            t0 = time.perf_counter()
            sessions[k].run(None, feed)
            times[k].append(time.perf_counter() - t0)
        it += 1
    t = {k: np.array(v) for k, v in times.items()}
    rng = np.random.default_rng(0)
    res = {"iterations": it, "warmup": warmup, "threads": 1, "order": "shuffled per iteration", "median_ms": {k: float(np.median(v) * 1e3)
                                                                          for k, v in t.items()}, "bits": {}}
    for bits, g in groups.items():
        tb = {"float": t["float"], **{k.split(":", 1)[1]: v for k, v in t.items() if k.startswith(bits + ":")}}
        res["bits"][bits] = {"ratios": {f"{a}/{b}": _ratio(tb[a], tb[b], rng) for a, b in RATIOS},
                             "histograms": _histograms({k: str(p) for k, p in g.items()})}
    return res
