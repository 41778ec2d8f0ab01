"""CWAC fit: the closed-form channel-wise affine compensation of QwT-v2.

For one layer and output channel c, over every sample and every spatial
position / token (channel axis 1 for Conv/ConvTranspose outputs, the last axis
for Gemm/MatMul outputs)::

    minimise  Σ (g_c·q + β_c − f)²  + λ·N·(g_c − 1)²

with q the quantized path's output and f the target.  From five running sums
per channel (N, Σq, Σf, Σq², Σqf), accumulated in float64 batch by batch::

    g_c = (cov(q,f) + λ) / (var(q) + λ)        β_c = mean(f) − g_c·mean(q)

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

    def update(self, q: np.ndarray, f: np.ndarray) -> None:
        axis = self.axis % q.ndim
        q2 = np.moveaxis(q, axis, -1).reshape(-1, self.channels).astype(np.float64)
        f2 = np.moveaxis(f, axis, -1).reshape(-1, self.channels).astype(np.float64)
        self.n += q2.shape[0]
        self.sq += q2.sum(0)
        self.sf += f2.sum(0)
        self.sqq += np.einsum("ij,ij->j", q2, q2)
        self.sqf += np.einsum("ij,ij->j", q2, f2)
        self.sff += np.einsum("ij,ij->j", f2, f2)

    def mse(self, gain: np.ndarray | None = None, bias: np.ndarray | None = None) -> float:
        """Mean squared error of (g·q + β) vs f over all channels, from the sums."""
        g = np.ones(self.channels) if gain is None else np.asarray(gain, np.float64)
        b = np.zeros(self.channels) if bias is None else np.asarray(bias, np.float64)
        if self.n == 0:
            return 0.0
        # Σ (g q + b − f)² = g²Σq² + n b² + Σf² + 2 g b Σq − 2 g Σqf − 2 b Σf
        per = g * g * self.sqq + self.n * b * b + self.sff + 2 * g * b * self.sq - 2 * g * self.sqf - 2 * b * self.sf
        return float(np.sum(per) / (self.n * self.channels))


@dataclasses.dataclass(frozen=True)
class Compensation:
    """A fitted per-channel affine map ``y' = gain ⊙ y + bias`` on ``axis``."""

    layer: str
    gain: np.ndarray
    bias: np.ndarray
    axis: int
    target: str
    stats: dict


def fit_affine(sums: ChannelSums, lam: float = 0.0, max_gain: float = 4.0) -> tuple[np.ndarray, np.ndarray, dict]:
    """Closed-form (g, β) per channel with the guards of the module doc."""
    n = max(sums.n, 1.0)
    mq, mf = sums.sq / n, sums.sf / n
    var_q = sums.sqq / n - mq * mq
    cov = sums.sqf / n - mq * mf
    flat = var_q <= 1e-12 * np.maximum(sums.sqq / n, 1e-30)
    with np.errstate(divide="ignore", invalid="ignore"):
        g = (cov + lam) / (var_q + lam)
    g = np.where(flat, 1.0, g)
    bad = ~np.isfinite(g) | (np.abs(g) > max_gain)
    g = np.where(bad, 1.0, g)
    beta = np.where(bad, 0.0, mf - g * mq)
    stats = {"zero_variance": int(np.count_nonzero(flat & ~bad)), "rejected_channels": int(np.count_nonzero(bad)),
             "gain_min": float(g.min()), "gain_max": float(g.max())}
    return g.astype(np.float32), beta.astype(np.float32), stats


def build_graphs(qmodel, compensations: dict[str, Compensation]):
    """(unfused, fused, fold stats) ModelProtos for ``compensations`` on the QDQ model ``qmodel``.

    β is first snapped to the folded layer's int32 bias grid, so both graphs
    compute the same function up to float rounding.
    """
    import onnx_graphsurgeon as gs

    from .graph_io import export_model
    from .passes.fold_compensation import FoldCompensationPass, snap_bias
    from .passes.insert_compensation import InsertCompensationPass

    graph = gs.import_onnx(qmodel)
    nodes = {n.name: n for n in graph.nodes}
    snapped = {k: dataclasses.replace(c, bias=snap_bias(nodes[k], c)) for k, c in compensations.items()}
    unfused = export_model(InsertCompensationPass(snapped)(gs.import_onnx(qmodel)).graph)
    result = FoldCompensationPass(snapped)(graph)
    return unfused, export_model(result.graph), result.stats
