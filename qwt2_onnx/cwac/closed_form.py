"""The closed form of QwT-v2's channel-wise affine compensation (CWAC): sums in, map out.

For one layer and output channel c, over every sample and every spatial
position / token (channel axis 1 for Conv/ConvTranspose outputs, the last axis
for Gemm/MatMul outputs)::

    minimise  Σ (g_c·q + β_c − f)²  + λ·N·(g_c − 1)²

with q the quantized path's output and f the target.  From five running sums
per channel (N, Σq, Σf, Σq², Σqf), accumulated in float64 batch by batch::

    g_c = (cov(q,f) + λ) / (var(q) + λ)        β_c = mean(f) − g_c·mean(q)

A layer whose output is a score head's logits (it reaches a Sigmoid at a
graph output through data movement only: YOLO's class convs, a text
detector's probability-map layer) is fitted to keep the target's spread
instead (``keep_spread``)::

    g_c = sign(cov(q,f)) · sqrt((var(f) + λ) / (var(q) + λ))    β_c as above

Least squares returns E[f | q]: where q is noisy (correlation ρ with f) it
shrinks every logit's distance from the channel mean by ρ², and a score head's
mean is the background, far below the threshold the scores are read against.
True positives are pulled down and lost.  The spread fit shrinks that distance
by ρ only: on YOLOv8n W4A8 the positives' logits sat 1.9 below the float ones
with least squares, 0.7 with the spread kept (docs/CWAC.md has the task
metrics).  Such a head's held-out gate compares scores, σ(g·q + β) against
σ(f) (:func:`sigmoid_sq_error`), not logits: the logits' squared error is the
background's, which least squares minimises by construction.

Guards: a zero-variance channel gets g = 1, β = mean(f − q); a non-finite gain
or one outside ``[-max_gain, max_gain]`` leaves the channel alone (g = 1,
β = 0) and is counted.  Gains below 1 are normal (shrinkage when noise
dominates) and are kept.
"""
from __future__ import annotations

import dataclasses
import numpy as np


@dataclasses.dataclass
class ChannelSums:
    """Running per-channel sums of q, f, q², q·f, f² (float64) and the count."""

    channels: int
    axis: int
    n: float = 0.0
    sq: np.ndarray = None
    sf: np.ndarray = None
    sqq: np.ndarray = None
    sqf: np.ndarray = None
    sff: np.ndarray = None

    def __post_init__(self) -> None:
        for name in ("sq", "sf", "sqq", "sqf", "sff"):
            if getattr(self, name) is None:
                setattr(self, name, np.zeros(self.channels, np.float64))

    @staticmethod
    def terms(q: np.ndarray, f: np.ndarray, axis: int) -> "ChannelSums":
        """One chunk's sums (channels on ``axis``), to be :meth:`add`-ed where they are merged: adding chunks'
        terms in order gives the same float64 sums as :meth:`update`-ing with the chunks in that order."""
        channels = q.shape[axis % q.ndim]
        q2 = np.moveaxis(q, axis % q.ndim, -1).reshape(-1, channels).astype(np.float64)
        f2 = np.moveaxis(f, axis % f.ndim, -1).reshape(-1, channels).astype(np.float64)
        return ChannelSums(channels, axis, float(q2.shape[0]), q2.sum(0), f2.sum(0), np.einsum("ij,ij->j", q2, q2),
                           np.einsum("ij,ij->j", q2, f2), np.einsum("ij,ij->j", f2, f2))

    def add(self, t: "ChannelSums") -> None:
        self.n += t.n
        self.sq += t.sq
        self.sf += t.sf
        self.sqq += t.sqq
        self.sqf += t.sqf
        self.sff += t.sff

    def update(self, q: np.ndarray, f: np.ndarray) -> None:
        self.add(self.terms(q, f, self.axis))

    def mse(self, gain: np.ndarray | None = None, bias: np.ndarray | None = None) -> float:
        """Mean squared error of (g·q + β) vs f over all channels, from the sums."""
        g = np.ones(self.channels) if gain is None else np.asarray(gain, np.float64)
        b = np.zeros(self.channels) if bias is None else np.asarray(bias, np.float64)
        if self.n == 0:
            return 0.0
        # Σ (g q + b − f)² = g²Σq² + n b² + Σf² + 2 g b Σq − 2 g Σqf − 2 b Σf
        per = g * g * self.sqq + self.n * b * b + self.sff + 2 * g * b * self.sq - 2 * g * self.sqf - 2 * b * self.sf
        return float(np.sum(per) / (self.n * self.channels))


def real_positions(mask: np.ndarray | None, axis: int, *tensors: np.ndarray) -> tuple[int, tuple[np.ndarray, ...]]:
    """(axis, ``tensors``) restricted to the positions ``mask`` ([batch, seq], nonzero = a real token)
    marks, for tensors whose channel ``axis`` is the last and that are laid out per token: [batch, seq,
    ..., channels], or [batch·seq, ..., channels] (tokens flattened row-major, as exporters reshape a
    linear layer's input to 2-D).  Each becomes [real positions, ..., channels]; the channel axis stays
    last.  Anything else (no mask, a Conv's [batch, channels, ...], other leading dims) comes back
    unchanged."""
    t = tensors[0]
    if mask is None or t.ndim < 2 or axis % t.ndim != t.ndim - 1:
        return axis, tensors
    keep = mask != 0
    if t.ndim >= 3 and t.shape[:2] == mask.shape:
        return -1, tuple(x[keep] for x in tensors)
    if t.shape[0] == mask.size:
        return -1, tuple(x[keep.ravel()] for x in tensors)
    return axis, tensors


def sigmoid_sq_error(q: np.ndarray, f: np.ndarray, axis: int, gain=None, bias=None) -> float:
    """Σ (σ(g·q + β) − σ(f))² (g = 1, β = 0 when not given; per channel on ``axis``): a score head's error
    where its scores are read.  Least squares on the logits would judge a head by its background, whose
    logits are far below any threshold and whose errors change no score."""
    y = q.astype(np.float64)
    if gain is not None:
        shape = [1] * q.ndim
        shape[axis % q.ndim] = -1
        y = y * np.reshape(gain, shape) + np.reshape(bias, shape)
    return float(np.sum((_sigmoid(y) - _sigmoid(f.astype(np.float64))) ** 2))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # no overflow for very negative logits


@dataclasses.dataclass(frozen=True)
class AffineMap:
    """One layer's fitted map before it is judged: ``gain``, ``bias`` per channel (float32) and the fit's
    counts (``zero_variance``, ``rejected_channels``, ``gain_min``/``gain_max``, ``fit``)."""

    gain: np.ndarray
    bias: np.ndarray
    stats: dict


def fit_affine(sums: ChannelSums, lam: float = 0.0, max_gain: float = 4.0, keep_spread: bool = False) -> AffineMap:
    """Closed-form (g, β) per channel with the guards of the module doc: least squares, or with
    ``keep_spread`` the map that matches the target's mean and variance (score heads)."""
    n = max(sums.n, 1.0)
    mq, mf = sums.sq / n, sums.sf / n
    var_q = sums.sqq / n - mq * mq
    cov = sums.sqf / n - mq * mf
    flat = var_q <= 1e-12 * np.maximum(sums.sqq / n, 1e-30)
    with np.errstate(divide="ignore", invalid="ignore"):
        if keep_spread:
            var_f = np.maximum(sums.sff / n - mf * mf, 0.0)
            g = np.sign(cov) * np.sqrt((var_f + lam) / (var_q + lam))
        else:
            g = (cov + lam) / (var_q + lam)
    g = np.where(flat, 1.0, g)
    bad = ~np.isfinite(g) | (np.abs(g) > max_gain)
    g = np.where(bad, 1.0, g)
    beta = np.where(bad, 0.0, mf - g * mq)
    stats = {"zero_variance": int(np.count_nonzero(flat & ~bad)), "rejected_channels": int(np.count_nonzero(bad)),
             "gain_min": float(g.min()), "gain_max": float(g.max()),
             "fit": "keep spread" if keep_spread else "least squares"}
    return AffineMap(g.astype(np.float32), beta.astype(np.float32), stats)
