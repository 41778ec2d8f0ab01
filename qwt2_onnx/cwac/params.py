"""``--cwac-params``: a compensation fitted elsewhere, read and checked against the plan."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..calib_data import read_small_npz
from ..errors import QwtError
from ..graph_queries import channel_axis, weight_shape
from .records import Compensation


def load_cwac_params(path, plan, qmodel) -> dict[str, Compensation]:
    """Compensation fitted elsewhere: an .npz with ``<weight>:gain`` and ``<weight>:bias`` arrays per layer,
    keyed by the float weight initializer's name (e.g. a PyTorch parameter name)."""
    arrays = read_small_npz(path, "CWAC parameters file (--cwac-params)",
                            "pass an .npz file with '<weight>:gain' and '<weight>:bias' arrays")
    by_weight = {lp.weight: lp for lp in plan.layers}
    weights = {k.rsplit(":", 1)[0] for k in arrays}
    unknown = sorted(w for w in weights if w not in by_weight)
    if unknown:
        raise QwtError(f"{len(unknown)} CWAC parameter name(s) match no quantized layer's weight",
                       notes=[f"unknown: {', '.join(unknown[:8])}", f"known weights: {', '.join(sorted(by_weight)[:8])}"],
                       fix="key the arrays by the float model's weight initializer names ('<weight>:gain')")
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
        comps[lp.node] = Compensation(lp.node, gain, bias, channel_axis(lp.op),
                                      "params", {"source": str(path)})
    return comps
