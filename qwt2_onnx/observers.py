"""Streaming range observers: they see one batch of a tensor at a time.

State is O(bins), never O(samples), so calibration memory does not grow with
the calibration set.

* ``minmax``     -- running min and max.
* ``percentile`` -- the p-th / (100-p)-th percentiles of a streaming histogram.
* ``entropy``    -- the clipping threshold that minimises the KL divergence
                    between the |x| histogram and its 8-bit quantized version
                    (the TensorRT calibration recipe).

The histogram is symmetric, ``[-A, A)`` in ``BINS`` bins.  When a batch
exceeds A, A doubles and adjacent bins merge pairwise, which is exact: no
counts are re-estimated.
"""
from __future__ import annotations

import dataclasses

import numpy as np

BINS = 4096  # signed bins; 2048 per side


@dataclasses.dataclass(frozen=True)
class ActivationRange:
    tensor: str
    rmin: float
    rmax: float
    method: str


def double_histogram(hist: np.ndarray) -> np.ndarray:
    """The histogram over ±A in ``BINS`` bins as a histogram over ±2A: adjacent bins merged pairwise (exact)."""
    merged = hist.reshape(-1, 2).sum(axis=1)  # BINS/2 bins of twice the width
    out = np.zeros(BINS, np.int64)
    out[BINS // 4: 3 * BINS // 4] = merged
    return out


class MinMaxObserver:
    method = "minmax"

    def __init__(self) -> None:
        self.lo, self.hi = np.inf, -np.inf

    def update(self, x: np.ndarray) -> None:
        if x.size:
            self.lo = min(self.lo, float(x.min()))
            self.hi = max(self.hi, float(x.max()))

    def range(self) -> tuple[float, float]:
        if not np.isfinite(self.lo):
            return 0.0, 0.0
        return self.lo, self.hi


class HistogramObserver(MinMaxObserver):
    def __init__(self, method: str = "percentile", percentile: float = 99.99, levels: int = 128):
        super().__init__()
        self.method = method
        self.percentile = percentile
        self.levels = levels
        self.amax = 0.0
        self.hist = np.zeros(BINS, np.int64)

    def update(self, x: np.ndarray) -> None:
        if not x.size:
            return
        super().update(x)
        need = max(abs(self.lo), abs(self.hi))
        if self.amax == 0.0:
            self.amax = need if need > 0 else 1e-12
        while need > self.amax:
            self._double()
        h, _ = np.histogram(x, bins=BINS, range=(-self.amax, self.amax))
        self.hist += h

    def _double(self) -> None:
        self.hist = double_histogram(self.hist)
        self.amax *= 2

    def _edges(self) -> np.ndarray:
        return np.linspace(-self.amax, self.amax, BINS + 1)

    def range(self) -> tuple[float, float]:
        lo, hi = super().range()
        if self.hist.sum() == 0 or lo == hi:
            return lo, hi
        if self.method == "percentile":
            cdf = np.cumsum(self.hist) / self.hist.sum()
            edges = self._edges()
            q_lo = edges[int(np.searchsorted(cdf, 1 - self.percentile / 100))]
            q_hi = edges[int(np.searchsorted(cdf, self.percentile / 100)) + 1]
            return max(lo, float(q_lo)), min(hi, float(q_hi))
        t = self._kl_threshold()
        return max(lo, -t), min(hi, t)

    def _kl_threshold(self) -> float:
        half = BINS // 2
        absh = (self.hist[half:] + self.hist[:half][::-1]).astype(np.float64)
        width = self.amax / half
        nz = np.nonzero(absh)[0]
        last = int(nz[-1]) + 1 if len(nz) else half
        if last <= self.levels:
            return last * width
        best_kl, best_i = np.inf, last
        for i in range(self.levels, last + 1, max(1, (last - self.levels) // 256)):
            p = absh[:i].copy()
            p[-1] += absh[i:].sum()
            q = self._quantized(absh[:i], i)
            kl = _kl(p, q)
            if kl < best_kl:
                best_kl, best_i = kl, i
        return best_i * width

    def _quantized(self, p: np.ndarray, i: int) -> np.ndarray:
        idx = (np.arange(i) * self.levels) // i
        sums = np.bincount(idx, weights=p, minlength=self.levels)
        nonzero = np.bincount(idx, weights=(p > 0).astype(np.float64), minlength=self.levels)
        q = np.where(p > 0, sums[idx] / np.maximum(nonzero[idx], 1), 0.0)
        return q


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    p = p / p.sum()
    q_sum = q.sum()
    if q_sum == 0:
        return np.inf
    q = q / q_sum
    mask = p > 0
    if np.any(q[mask] == 0):
        return np.inf
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


def make_observer(method: str, percentile: float = 99.99):
    if method == "minmax":
        return MinMaxObserver()
    return HistogramObserver(method, percentile)
