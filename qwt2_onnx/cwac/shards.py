"""The staged fit over shards of the calibration set (DESIGN.md §10): each shard's samples live with one stage
worker (``fit.StageWorker``) that keeps their stage-boundary tensors between stages; per stage it returns its
samples' channel-sum terms, the driver adds them in sample order, decides gains, biases and gates exactly as
one process does, and sends each stage's kept compensations back.

Why the result is byte-identical to one process: the fit runs one sample per onnxruntime call, a sample's
terms are computed by the same code wherever it runs, and float64 sums are added in the same order (sample
by sample, fit part first) whatever the split.  (On machines whose numpy or onnxruntime take other CPU code
paths — AVX2 vs AVX-512 — a sample's terms can differ in the last bits, as between two single-process runs
on those machines.)  What moves per stage: O(channels) numbers per sample and layer, and the kept
compensations, never a tensor.

``LocalShards`` runs the workers in this process, one after another: the protocol without a cluster (tests).
``qwt2_onnx.ray_shards.RayShards`` runs them as Ray actors.
"""
from __future__ import annotations

import dataclasses

import onnx

from ..config import CwacConfig
from ..policy import QuantPlan
from .fit import StageWorker, gather_in_turn
from .graphs import FitGraphs
from .gate import Parts


def shard_bounds(n: int, workers: int) -> list[tuple[int, int]]:
    """``workers`` contiguous ranges [lo, hi) covering 0..n, sizes differing by at most one (none empty
    unless n < workers)."""
    size, extra = divmod(n, workers)
    out, lo = [], 0
    for w in range(workers):
        hi = lo + size + (w < extra)
        out.append((lo, hi))
        lo = hi
    return [b for b in out if b[1] > b[0]] or [(0, n)]


def positions(parts: Parts) -> int:
    """How many sample positions the fit walks: the fit part, then the held-out part."""
    return sum(p.length if p.length is not None else sum(1 for _ in p) for p in (parts.fit, parts.hold))


@dataclasses.dataclass
class LocalShards:
    """``workers`` stage workers in this process, one after another."""

    workers: int = 2

    def start(self, float_model: onnx.ModelProto, qmodel: onnx.ModelProto, plan: QuantPlan, cfg: CwacConfig,
              target: str, heads: set[str], parts: Parts) -> list[StageWorker]:
        return [StageWorker(FitGraphs(float_model, qmodel, plan, target), cfg, heads, parts, lo, hi)
                for lo, hi in shard_bounds(positions(parts), self.workers)]

    gather = staticmethod(gather_in_turn)

    def stop(self, workers: list[StageWorker]) -> None:
        for w in workers:
            w.close()
