"""CWAC fit: the closed-form channel-wise affine compensation of QwT-v2.

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
import logging

import numpy as np

logger = logging.getLogger(__name__)


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
class Compensation:
    """A fitted per-channel affine map ``y' = gain ⊙ y + bias`` on ``axis``."""

    layer: str
    gain: np.ndarray
    bias: np.ndarray
    axis: int
    target: str
    stats: dict


def fit_affine(sums: ChannelSums, lam: float = 0.0, max_gain: float = 4.0, keep_spread: bool = False,
               ) -> tuple[np.ndarray, np.ndarray, dict]:
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
    return g.astype(np.float32), beta.astype(np.float32), stats


def build_graphs(qmodel, compensations: dict[str, Compensation], int32_bias: bool = True,
                 float_bias: frozenset[str] = frozenset()):
    """(unfused, fused, fold stats) ModelProtos for ``compensations`` on the QDQ model ``qmodel``.
    ``float_bias``: bias-free layers that get a float bias input rather than an int32 bias DQ
    (``FoldCompensationPass``).

    β is first snapped to the folded layer's int32 bias grid, so both graphs
    compute the same function up to float rounding.  A compensation that
    cannot be folded (shared weight, weight not a constant...) is left out of
    *both* graphs, with its reason in the stats: the unfused graph is always
    what the fused one computes.  Likewise a channel whose folded int32 bias
    would overflow int32 is left uncompensated (g = 1, β = 0) in both: counted
    per layer in ``stats["int32_bias_overflow"]`` and named in its strategy.
    """
    import onnx_graphsurgeon as gs

    from .graph_io import export_model
    from .passes.fold_compensation import (
        FoldCompensationPass,
        int32_bias_overflow,
        skip_reason,
        snap_bias,
    )
    from .passes.insert_compensation import InsertCompensationPass

    graph = gs.import_onnx(qmodel)
    nodes = {n.name: n for n in graph.nodes}
    reasons = {k: skip_reason(nodes.get(k)) for k in compensations}
    foldable, overflow = {}, {}
    for k, c in compensations.items():
        if reasons[k] is None:
            bad = int32_bias_overflow(nodes[k], c, int32_bias)
            foldable[k] = _leave_alone(c, bad, "int32_bias_overflow_left_alone") if bad.any() else c
            if bad.any():
                overflow[k] = int(bad.sum())
                logger.debug("%s: %d channel(s) left uncompensated, folded int32 bias would overflow", k, bad.sum())
    snapped = {k: dataclasses.replace(c, bias=snap_bias(nodes[k], c, int32_bias)) for k, c in foldable.items()}
    unfused = export_model(InsertCompensationPass(snapped)(gs.import_onnx(qmodel)).graph)
    result = FoldCompensationPass(snapped, int32_bias, float_bias)(graph)
    stats = result.stats
    stats["int32_bias_overflow"] = overflow
    for k in overflow:
        stats["strategies"][k] += "; channels left uncompensated (folded int32 bias would overflow)"
    for k, why in reasons.items():
        if why is not None:
            stats["strategies"][k] = f"skipped: {why}"
            stats["skipped"][why] = stats["skipped"].get(why, 0) + 1
    return unfused, export_model(result.graph), stats


def _leave_alone(comp: Compensation, channels: np.ndarray, reason: str) -> Compensation:
    """``comp`` with g = 1, β = 0 on ``channels`` (a bool mask), counted in its stats under ``reason``."""
    return dataclasses.replace(comp, gain=np.where(channels, 1.0, comp.gain).astype(np.float32),
                               bias=np.where(channels, 0.0, comp.bias).astype(np.float32),
                               stats={**comp.stats, reason: int(channels.sum())})


def constrain_full_range(qmodel, compensations: dict[str, Compensation]) -> tuple[dict[str, Compensation], int]:
    """Leave alone (g = 1, β = 0) every channel whose gain is negative but whose integer weight row holds the
    type's minimum (−128 / −8) or has a nonzero zero point: negating that row would overflow.  Only models
    quantized by another tool (upgrade mode) have such rows.  Returns (compensations, channels constrained)."""
    import onnx_graphsurgeon as gs

    from .policy import output_axis

    graph = gs.import_onnx(qmodel)
    nodes = {n.name: n for n in graph.nodes}
    out, constrained = {}, 0
    for name, comp in compensations.items():
        dq = nodes[name].inputs[1].inputs[0] if nodes[name].inputs[1].inputs else None
        if dq is None or dq.op != "DequantizeLinear" or not isinstance(dq.inputs[0], gs.Constant):
            out[name] = comp
            continue
        w = np.asarray(dq.inputs[0].values)
        scale = np.asarray(dq.inputs[1].values)
        zp = np.asarray(dq.inputs[2].values).astype(np.int64) if len(dq.inputs) > 2 else np.zeros(1, np.int64)
        axis = int(dq.attrs.get("axis", 1)) % w.ndim if scale.size > 1 else output_axis(nodes[name])
        rows = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
        unflippable = np.any(rows == _int_min(w), axis=1) | np.broadcast_to(zp.reshape(-1) != 0, (rows.shape[0],))
        bad = (comp.gain < 0) & unflippable if unflippable.size == comp.gain.size else np.zeros(comp.gain.size, bool)
        if bad.any():
            constrained += int(bad.sum())
            comp = _leave_alone(comp, bad, "full_range_negative_gain_left_alone")
        out[name] = comp
    return out, constrained


def _int_min(w: np.ndarray) -> int:
    name = w.dtype.name
    if name in ("int4",):
        return -8
    return int(np.iinfo(w.dtype).min) if w.dtype.kind == "i" else -(2**31)


def load_cwac_params(path, plan, qmodel) -> dict[str, Compensation]:
    """Compensation fitted elsewhere: an .npz with ``<weight>:gain`` and ``<weight>:bias`` arrays per layer,
    keyed by the float weight initializer's name (e.g. a PyTorch parameter name)."""
    from .errors import QwtError

    from .calib_data import read_small_npz

    arrays = read_small_npz(path, "CWAC parameters file (--cwac-params)",
                            "pass an .npz file with '<weight>:gain' and '<weight>:bias' arrays")
    by_weight = {lp.weight: lp for lp in plan.layers}
    weights = {k.rsplit(":", 1)[0] for k in arrays}
    unknown = sorted(w for w in weights if w not in by_weight)
    if unknown:
        raise QwtError(f"{len(unknown)} CWAC parameter name(s) match no quantized layer's weight",
                       notes=[f"unknown: {', '.join(unknown[:8])}", f"known weights: {', '.join(sorted(by_weight)[:8])}"],
                       fix="key the arrays by the float model's weight initializer names ('<weight>:gain')")
    import onnx_graphsurgeon as gs

    from .passes.fold_compensation import weight_shape

    nodes = {n.name: n for n in gs.import_onnx(qmodel).nodes}
    comps = {}
    for w in sorted(weights):
        lp = by_weight[w]
        channels = weight_shape(nodes[lp.node])[lp.axis]
        gain = np.asarray(arrays.get(f"{w}:gain", np.ones(channels or 1)), np.float32).reshape(-1)
        bias = np.asarray(arrays.get(f"{w}:bias", np.zeros(gain.size)), np.float32).reshape(-1)
        if channels is not None and (gain.size != channels or bias.size != channels):
            raise QwtError(f"CWAC parameters for '{w}' do not match its {channels} output channels",
                           notes=[f"gain: {gain.size} values, bias: {bias.size} values"],
                           fix="give one gain and one bias per output channel")
        if not (np.all(np.isfinite(gain)) and np.all(np.isfinite(bias))):
            raise QwtError(f"CWAC parameters for '{w}' hold NaN or Inf", fix="fix the exported parameters")
        comps[lp.node] = Compensation(lp.node, gain, bias, 1 if lp.op in ("Conv", "ConvTranspose") else -1,
                                      "params", {"source": str(path)})
    return comps
