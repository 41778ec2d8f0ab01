"""Quantization parameters: the arithmetic, kept apart from the graph edits.

Activations are per-tensor::

    u8 (asymmetric): scale = (max(r_max,0) - min(r_min,0)) / (2^b - 1),  zp = round(-min(r_min,0) / scale)
    s8 (symmetric):  scale = max(|r_min|, |r_max|) / (2^(b-1) - 1),     zp = 0

Weights are per output channel, symmetric on the narrow range ``[-qmax, qmax]``
(so flipping a row's sign never overflows)::

    s_w[c] = max|W[c]| / qmax          w_q[c] = clip(round(W[c] / s_w[c]), -qmax, qmax)

An int32 bias uses the scale onnxruntime recomputes when it fuses the layer,
exactly ``s_x * s_w[c]``:  ``b_q[c] = round(b[c] / (s_x * s_w[c]))``.

Int32 bias floor.  A near-dead channel (BatchNorm γ ≈ 0, so its folded weight
row is ~0) gets ``s_w[c] ≈ 1e-10`` and ``b[c] / (s_x·s_w[c])`` far beyond int32:
the bias would be clipped and deployed wrong.  So, where the bias is int32::

    s_w[c] = max(max|W[c]| / qmax,  |b[c]| / (s_x · B)),    B = 2^30

keeps ``|b_q[c]| ≤ B``.  The floor binds only where the row's largest possible
contribution ``K·255·s_x·max|W[c]|`` (K inputs, u8 codes) is below
``K·255·qmax·|b[c]|/B`` ≤ ``K·3e-5·|b[c]|``; its integer weights then shrink
(to 0/±1 for a dead row) and its rounding error is at most
``K·128·s_x·s_w[c]`` = ``K·1.2e-7·|b[c]|``: negligible next to the bias.

Why B = 2^30 and not 2^31 − 1: CWAC later folds ``b'[c] = (g·b + β)/(s_x·|g|·s_w)``
into the same int32; the factor 2 lets |β/g| reach |b| (on EfficientNet-Lite0
the fold takes codes to 1.04·2^30; with no headroom 7 channels would have to
stay uncompensated) and keeps the accumulator sum far from int32's edge.  A fold
that still overflows leaves the channel uncompensated, reported
(``fold_compensation.int32_bias_overflow``).  onnxruntime's own quantizer
(≥ 1.20, ``_adjust_weight_scale_for_int32_bias``, on unless
``QDQDisableWeightAdjustForInt32Bias``) raises the weight scale the same way,
per channel, to the bare minimum (``s_x·s_w ≥ 1.0001·2|b| / (2^32 − 2)``): no
headroom, since nothing is folded into its bias afterwards.
"""
from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np

from .config import QuantConfig
from .observers import ActivationRange

TINY = np.float32(1e-12)  # scale used for an all-zero tensor or channel
INT32_BIAS_BOUND = 2.0 ** 30  # |int32 bias code| after quantization (module doc: headroom for the CWAC fold)


@dataclasses.dataclass(frozen=True)
class ActivationQParams:
    scale: np.float32
    zero_point: np.ndarray  # 0-d array of the quantized dtype


def integer_range(dtype) -> tuple[int, int]:
    """The smallest and largest value of an integer tensor type, 4-bit (ml_dtypes) included."""
    return {"int4": (-8, 7), "uint4": (0, 15)}.get(np.dtype(dtype).name) or \
        (int(np.iinfo(dtype).min), int(np.iinfo(dtype).max))


def activation_dtype(cfg: QuantConfig):
    return np.uint8 if cfg.act_type == "u8" else np.int8


def weight_dtype(cfg: QuantConfig):
    return ml_dtypes.int4 if cfg.wbits == 4 else np.int8


def activation_qparams(r: ActivationRange, cfg: QuantConfig) -> ActivationQParams:
    lo, hi = min(r.rmin, 0.0), max(r.rmax, 0.0)
    dtype = activation_dtype(cfg)
    if cfg.act_type == "u8":
        qmax = 2 ** cfg.abits - 1
        scale = np.float32((hi - lo) / qmax) if hi > lo else np.float32(1.0)
        zp = int(np.clip(np.round(-lo / scale), 0, qmax))
    else:
        qmax = 2 ** (cfg.abits - 1) - 1
        amax = max(-lo, hi)
        scale = np.float32(amax / qmax) if amax > 0 else np.float32(1.0)
        zp = 0
    if scale < TINY:
        scale = TINY
    return ActivationQParams(scale, np.array(zp, dtype=dtype))


def bias_scale_floor(b: np.ndarray, s_x: float, bound: float = INT32_BIAS_BOUND) -> np.ndarray:
    """Smallest per-channel weight scale that keeps ``|b / float32(s_x·s_w)| ≤ bound`` (float32; the 2^-20
    margin covers the float32 roundings of s_w and of the bias scale s_x·s_w)."""
    floor = np.abs(np.asarray(b, np.float64).reshape(-1)) / (float(np.float32(s_x)) * bound) * (1 + 2.0 ** -20)
    return floor.astype(np.float32)


def quantize_weight(w: np.ndarray, axis: int, qmax: int,
                    min_scale: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel symmetric: returns (integer weights as int8 values, float32 scales).

    ``min_scale``: per-channel floor on the scale (:func:`bias_scale_floor`, for an int32 bias)."""
    reduce = tuple(i for i in range(w.ndim) if i != axis)
    amax = np.max(np.abs(w.astype(np.float64)), axis=reduce)
    scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
    if min_scale is not None:
        scale = np.maximum(scale, np.asarray(min_scale, np.float32))
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.round(w / scale.reshape(shape).astype(np.float64)), -qmax, qmax).astype(np.int8)
    return q, scale


def quantize_bias(b: np.ndarray, s_x: np.float32, s_w: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """int32 bias with scale exactly s_x*s_w (float32); returns (b_q, scale, n_clipped)."""
    scale = (np.float32(s_x) * s_w.astype(np.float32)).astype(np.float32)
    q = np.round(b.astype(np.float64) / scale.astype(np.float64))
    lim = np.iinfo(np.int32)
    clipped = int(np.count_nonzero((q < lim.min) | (q > lim.max)))
    return np.clip(q, lim.min, lim.max).astype(np.int32), scale, clipped
