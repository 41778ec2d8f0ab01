"""Streaming range observers: they see one batch of a tensor at a time.

State is O(bins), never O(samples), so calibration memory does not grow with
the calibration set.

* ``minmax``     -- running min and max.
* ``percentile`` -- the p-th / (100-p)-th percentiles of a streaming histogram.
* ``entropy``    -- the clipping threshold that minimises the KL divergence
                    between the |x| histogram and its 8-bit quantized version
                    (the TensorRT calibration recipe).
* ``auto``       -- ``percentile``, except on a per-token tensor (2-D or 3-D,
                    channels on the last axis, at least ``MIN_POSITIONS``
                    positions per channel) where every value the percentile range would clip
                    lies in a few channels (at most ``max(2, channels/100)``):
                    there the full range is kept (``minmax``).  A transformer's
                    LayerNorm outputs carry a systematic outlier channel that
                    the network reads; clipping it cost MiniLM-L6 its fidelity
                    (embedding cosine 0.909 percentile vs 0.991 minmax,
                    docs/TRANSFORMERS.md), while a tail spread over many
                    channels (GELU, attention outputs) is clipped as before.

The histogram is symmetric, ``[-A, A)`` in ``BINS`` bins.  When a batch
exceeds A, A doubles and adjacent bins merge pairwise, which is exact: no
counts are re-estimated.
"""
from __future__ import annotations

import dataclasses

import numpy as np

BINS = 4096  # signed bins; 2048 per side
MIN_POSITIONS = 256  # ``auto``: positions per channel for a tensor to count as per-token


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
        self.channel_max: np.ndarray | None = None  # ``auto``: max |x| per channel (last axis)
        self.positions = 0  # ``auto``: positions seen per channel; -1 once the channel count changed

    def update(self, x: np.ndarray) -> None:
        if not x.size:
            return
        super().update(x)
        if self.method == "auto":
            self._channels(x)
        need = max(abs(self.lo), abs(self.hi))
        if self.amax == 0.0:
            self.amax = need if need > 0 else 1e-12
        while need > self.amax:
            self._double()
        h, _ = np.histogram(x, bins=BINS, range=(-self.amax, self.amax))
        self.hist += h

    def _channels(self, x: np.ndarray) -> None:
        # per-token layouts only: [positions, channels] or [batch, tokens, channels]; a 4-D map (NCHW) is not
        # (a channels-first 3-D tensor, Conv1d's, reads as per-token here: the rule was not measured there)
        if x.ndim not in (2, 3) or self.positions < 0:
            self.positions = -1
            return
        m = np.abs(x.reshape(-1, x.shape[-1])).max(axis=0)
        if self.channel_max is not None and self.channel_max.shape != m.shape:
            self.positions = -1
            return
        self.channel_max = m if self.channel_max is None else np.maximum(self.channel_max, m)
        self.positions += x.size // x.shape[-1]

    def outlier_channels(self, lo: float, hi: float) -> bool:
        """``auto``: does everything the range [lo, hi] clips lie in a few channels of a per-token tensor?"""
        if self.channel_max is None or self.positions < MIN_POSITIONS:
            return False
        past = int(np.count_nonzero(self.channel_max > max(-lo, hi)))
        return 0 < past <= max(2, self.channel_max.size // 100)

    def _double(self) -> None:
        self.hist = double_histogram(self.hist)
        self.amax *= 2

    def _edges(self) -> np.ndarray:
        return np.linspace(-self.amax, self.amax, BINS + 1)

    def range(self) -> tuple[float, float]:
        lo, hi = super().range()
        if self.hist.sum() == 0 or lo == hi:
            return lo, hi
        if self.method in ("percentile", "auto"):
            cdf = np.cumsum(self.hist) / self.hist.sum()
            edges = self._edges()
            q_lo = edges[int(np.searchsorted(cdf, 1 - self.percentile / 100))]
            q_hi = edges[int(np.searchsorted(cdf, self.percentile / 100)) + 1]
            clipped = max(lo, float(q_lo)), min(hi, float(q_hi))
            return (lo, hi) if self.method == "auto" and self.outlier_channels(*clipped) else clipped
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
