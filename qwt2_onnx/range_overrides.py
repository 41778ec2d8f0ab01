"""Activation ranges given from outside (e.g. a calibrated PyTorch model) instead of observed by calibration.

An ``.npz`` of ``[lo, hi]`` pairs keyed by the *weight* of a quantized layer, the same key
``--cwac-params`` uses (the float weight initializer's name, i.e. a PyTorch parameter name)::

    '<weight>:input_range'    the layer's input activation (its per-tensor Q/DQ)
    '<weight>:output_range'   the layer's output point (Conv/ConvTranspose: its output, or the output
                              of the Relu that follows it; Gemm/MatMul have none)

The range becomes that tensor's ``ActivationRange`` (method ``override``); its scale and zero point
then follow ``quant.activation_qparams`` exactly as for a calibrated range.  Several keys may name
one tensor (two layers reading it, or one layer's output point that is another's input): their
ranges must agree.  A key that matches no quantized layer, or a bad value, is a ``QwtError``.
"""
from __future__ import annotations

import numpy as np

from .calib_data import read_small_npz
from .errors import QwtError
from .observers import ActivationRange
from .policy import QuantPlan

SUFFIXES = ("input_range", "output_range")


def load_range_overrides(path, plan: QuantPlan) -> dict[str, ActivationRange]:
    """tensor name -> ActivationRange for every key of the ``.npz`` at ``path`` (see module doc)."""
    arrays = read_small_npz(path, "activation ranges file (--act-ranges)",
                            "pass an .npz of '<weight>:input_range' / '<weight>:output_range' arrays [lo, hi]")
    by_weight = {lp.weight: lp for lp in plan.layers}
    out: dict[str, ActivationRange] = {}
    source: dict[str, str] = {}
    for key in sorted(arrays):
        weight, _, kind = key.rpartition(":")
        if kind not in SUFFIXES:
            raise QwtError(f"activation range key '{key}' does not end in ':input_range' or ':output_range'",
                           fix="name each array '<weight>:input_range' or '<weight>:output_range'")
        lp = by_weight.get(weight)
        if lp is None:
            raise QwtError(f"activation range key '{key}' matches no quantized layer's weight",
                           notes=[f"known weights: {', '.join(sorted(by_weight)[:8])}"
                                  + (" ..." if len(by_weight) > 8 else "")],
                           fix="key the ranges by the float model's weight initializer names; "
                               "a layer left in float (--exclude) takes no range")
        tensor = lp.activation if kind == "input_range" else lp.output
        if tensor is None:
            raise QwtError(f"activation range key '{key}': layer '{lp.node}' ({lp.op}) has no quantized output",
                           notes=["only Conv/ConvTranspose outputs that are not graph outputs get an output Q/DQ"],
                           fix=f"drop '{key}'")
        lo, hi = _pair(key, arrays[key])
        if tensor in out and (out[tensor].rmin, out[tensor].rmax) != (lo, hi):
            raise QwtError(f"activation range keys '{source[tensor]}' and '{key}' name the same tensor "
                           f"'{tensor}' with different ranges",
                           notes=[f"{source[tensor]}: [{out[tensor].rmin:g}, {out[tensor].rmax:g}]",
                                  f"{key}: [{lo:g}, {hi:g}]"],
                           fix="give one range per tensor (one quantizer is shared by every reader)")
        out[tensor], source[tensor] = ActivationRange(tensor, lo, hi, "override"), key
    return out


def _pair(key: str, value: np.ndarray) -> tuple[float, float]:
    v = np.asarray(value, np.float64).reshape(-1)
    if v.size != 2 or not np.all(np.isfinite(v)) or v[0] > v[1]:
        raise QwtError(f"activation range '{key}' is not a finite [lo, hi] pair with lo <= hi",
                       notes=[f"value: {np.asarray(value).tolist()}"], fix="store two numbers, lo first")
    return float(v[0]), float(v[1])
