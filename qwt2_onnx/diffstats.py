"""Numerical difference between a reference and a candidate tensor, streamed over batches.

:class:`DiffAccumulator` sees one batch at a time and keeps O(1) state (a
fixed log-spaced histogram of |Δ| for the p99 and the error histogram), so a
check over any number of samples needs the memory of one batch.
:class:`DiffStats` is the result record; :class:`Tolerance` and
:class:`Verdict` turn one statistic into PASSED / FAILED with the minimum
tolerance that would have passed.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np

# |Δ| histogram edges: 10 bins per decade from 1e-12 to 1e6, plus an underflow bin (exact zeros land there)
HIST_EDGES = np.logspace(-12, 6, 181)
STATISTICS = ("max", "p99", "mean")
CHUNK = 1 << 17  # elements per float64 piece in DiffAccumulator.update: 1 MiB, stays in cache


_KEY_SHIFT = 44  # a float64's sign, exponent and top 8 mantissa bits: 2^20 ranges, each 2^-8 of its value wide


@functools.cache
def _key_table() -> np.ndarray:
    """Bin (``searchsorted(HIST_EDGES, v, side="right")``) of every float64 whose top 20 bits are the index,
    or 255 where the range holds an edge, or is negative or NaN: those few values are searched exactly."""
    lo = (np.arange(1 << 20, dtype=np.uint64) << np.uint64(_KEY_SHIFT)).view(np.float64)
    hi = ((np.arange(1 << 20, dtype=np.uint64) << np.uint64(_KEY_SHIFT)) | np.uint64((1 << _KEY_SHIFT) - 1)).view(np.float64)
    with np.errstate(invalid="ignore"):
        b_lo, b_hi = np.searchsorted(HIST_EDGES, lo, side="right"), np.searchsorted(HIST_EDGES, hi, side="right")
        table = np.where((b_lo == b_hi) & (lo >= 0) & ~np.isnan(lo) & ~np.isnan(hi), b_lo, 255)
    return table.astype(np.uint8)


def histogram_bins(e: np.ndarray) -> np.ndarray:
    """Counts of ``e`` (|Δ|, float64) per HIST_EDGES bin: exactly
    ``bincount(searchsorted(HIST_EDGES, e, side="right"))``, several times as fast.  A value's top 20 bits
    (sign, exponent, 8 mantissa bits) name a range 0.4 % wide; the bins are 26 % wide, so all but the
    ranges that straddle an edge lie in one bin, read from a table.  The rest (about 1 % of values) are
    searched."""
    e = np.ascontiguousarray(e, np.float64).reshape(-1)
    # the top 20 bits as a signed index (masked: the same as the unsigned shift for every value): numpy
    # gathers with intp indices directly, where uint64 ones are converted first (a third of the time)
    key = e.view(np.int64) >> _KEY_SHIFT
    np.bitwise_and(key, (1 << 20) - 1, out=key)
    bins = _key_table()[key]
    counts = np.bincount(bins, minlength=256)[:len(HIST_EDGES) + 1].astype(np.int64)
    hard = e[bins == 255]
    if hard.size:
        counts += np.bincount(np.searchsorted(HIST_EDGES, hard, side="right"), minlength=len(HIST_EDGES) + 1)
    return counts


@dataclasses.dataclass
class DiffStats:
    """How far ``candidate`` is from ``reference`` (one tensor, or a named part of one)."""

    name: str
    elements: int
    max_abs: float
    worst_index: list[int]  # [sample, *element index] of the max |Δ|
    mean_abs: float
    p99_abs: float  # upper edge of the histogram bin holding the 99th percentile
    max_rel: float  # max |Δ| / max |reference|
    max_ref: float
    cosine: float
    sqnr_db: float
    lsb_scale: float | None = None  # quantization scale the LSB numbers are in, when the tensor has one
    histogram: list[int] = dataclasses.field(default_factory=list)  # counts per HIST_EDGES bin (index 0: < 1e-12)

    @property
    def max_lsb(self) -> float | None:
        return self.max_abs / self.lsb_scale if self.lsb_scale else None

    def brief(self) -> dict[str, float]:
        """SQNR, cosine and max |Δ|, rounded: a fidelity cell of the benchmark and zoo tables."""
        return {"sqnr_db": round(self.sqnr_db, 3), "cosine": round(self.cosine, 6), "max_abs": self.max_abs}

    def statistic(self, which: str) -> float:
        return {"max": self.max_abs, "p99": self.p99_abs, "mean": self.mean_abs}[which]


class DiffAccumulator:
    def __init__(self, name: str):
        self.name = name
        self.n = 0
        self.samples = 0
        self.sum_abs = self.sum_ref2 = self.sum_cand2 = self.sum_err2 = self.sum_dot = 0.0
        self.max_abs = self.max_ref = 0.0
        self.worst: list[int] = []
        self.hist = np.zeros(len(HIST_EDGES) + 1, np.int64)

    def update(self, ref: np.ndarray, cand: np.ndarray) -> None:
        r, c = np.asarray(ref), np.asarray(cand)
        if r.shape != c.shape:
            raise ValueError(f"{self.name}: reference shape {r.shape} != candidate shape {c.shape}")
        rf, cf = r.reshape(-1), c.reshape(-1)
        for start in range(0, rf.size, CHUNK):  # in float64, a cache-sized piece at a time
            self._add(rf[start:start + CHUNK].astype(np.float64), cf[start:start + CHUNK].astype(np.float64),
                      start, r.shape)
        self.n += rf.size
        self.samples += r.shape[0] if r.ndim else 1

    def _add(self, r: np.ndarray, c: np.ndarray, offset: int, shape: tuple[int, ...]) -> None:
        e = c - r
        np.abs(e, out=e)
        if e.size:
            i = int(np.argmax(e))
            if e[i] > self.max_abs or not self.worst:
                self.max_abs = float(e[i])
                idx = list(np.unravel_index(offset + i, shape)) if shape else []
                if idx:
                    idx[0] += self.samples
                self.worst = [int(v) for v in idx]
            self.max_ref = max(self.max_ref, float(r.max()), -float(r.min()))
        self.sum_abs += float(e.sum())
        # einsum, not BLAS: a threaded BLAS dot stalls for milliseconds on a busy machine (ppocr_det's check
        # took 120 s instead of 10 with another job running) and splits its sums by the number of threads
        self.sum_ref2 += float(np.einsum("i,i->", r, r))
        self.sum_cand2 += float(np.einsum("i,i->", c, c))
        self.sum_err2 += float(np.einsum("i,i->", e, e))
        self.sum_dot += float(np.einsum("i,i->", r, c))
        self.hist += histogram_bins(e)

    def result(self, lsb_scale: float | None = None) -> DiffStats:
        den = np.sqrt(self.sum_ref2 * self.sum_cand2)
        cosine = float(self.sum_dot / den) if den > 0 else (1.0 if self.sum_err2 == 0 else 0.0)
        sqnr = float("inf") if self.sum_err2 == 0 else 10 * np.log10(max(self.sum_ref2, 1e-300) / self.sum_err2)
        return DiffStats(self.name, self.n, self.max_abs, self.worst, self.sum_abs / max(self.n, 1),
                         self._p99(), self.max_abs / self.max_ref if self.max_ref > 0 else float(self.max_abs > 0),
                         self.max_ref, cosine, float(sqnr), lsb_scale, [int(v) for v in self.hist])

    def _p99(self) -> float:
        if self.n == 0:
            return 0.0
        k = int(np.searchsorted(np.cumsum(self.hist), 0.99 * self.n))
        return 0.0 if k == 0 else float(HIST_EDGES[min(k, len(HIST_EDGES) - 1)])


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """Pass when ``statistic(|Δ|) ≤ atol + rtol·max|reference|``."""

    atol: float = 0.0
    rtol: float = 1e-5
    statistic: str = "max"

    def __post_init__(self) -> None:
        from .errors import QwtError

        if self.statistic not in STATISTICS:
            raise QwtError(f"unknown statistic '{self.statistic}'", fix=f"use one of {', '.join(STATISTICS)}")
        if self.atol < 0 or self.rtol < 0:
            raise QwtError("tolerances must be ≥ 0", notes=[f"atol {self.atol}, rtol {self.rtol}"])


@dataclasses.dataclass
class Verdict:
    passed: bool
    kind: str  # "output" | "layer"
    name: str
    statistic: str
    value: float
    threshold: float
    min_atol: float  # the smallest atol that would pass with this rtol
    min_rtol: float  # the smallest rtol that would pass with this atol

    @classmethod
    def judge(cls, stats: DiffStats, tol: Tolerance, kind: str = "output") -> "Verdict":
        value = stats.statistic(tol.statistic)
        threshold = tol.atol + tol.rtol * stats.max_ref
        min_atol = max(0.0, value - tol.rtol * stats.max_ref)
        min_rtol = max(0.0, (value - tol.atol) / stats.max_ref) if stats.max_ref > 0 else (0.0 if value <= tol.atol
                                                                                            else float("inf"))
        return cls(bool(value <= threshold), kind, stats.name, tol.statistic, value, threshold, min_atol, min_rtol)

    def line(self) -> str:
        word, op = ("PASSED", "≤") if self.passed else ("FAILED", ">")
        text = (f"{word} | {self.kind} '{self.name}' | {self.statistic} |Δ| {self.value:.3g} {op} "
                f"{self.threshold:.3g} (atol + rtol·max|ref|)")
        if not self.passed:
            text += f" | would pass with atol ≥ {self.min_atol:.3g} or rtol ≥ {self.min_rtol:.3g}"
        return text
