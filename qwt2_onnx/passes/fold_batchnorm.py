"""FoldBatchNormPass: fold BatchNormalization into the Conv that feeds it.

For a Conv with weight ``W[o, i/g, k...]`` and bias ``b[o]`` followed by
``BatchNormalization(scale γ, bias δ, mean μ, var σ², epsilon ε)``::

    s      = γ / sqrt(σ² + ε)                   (per output channel o)
    W'[o]  = s[o] · W[o]
    b'[o]  = s[o] · (b[o] − μ[o]) + δ[o]

    x ─► Conv(W, b) ─► BN ─► y        ==>        x ─► Conv(W', b') ─► y

Preconditions (else skip with a reason): the Conv output feeds only the BN and
is not a graph output; W, b and all four BN parameters are constants; the BN
is in inference form (one output).  The Conv's weight must not be shared.
"""
from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs

from . import PassResult

logger = logging.getLogger(__name__)


def _const(t: gs.Tensor) -> np.ndarray | None:
    return np.asarray(t.values) if isinstance(t, gs.Constant) else None


class FoldBatchNormPass:
    def __call__(self, graph: gs.Graph) -> PassResult:
        folded, skipped = 0, Counter()
        graph_outputs = set(id(t) for t in graph.outputs)
        for bn in [n for n in graph.nodes if n.op == "BatchNormalization"]:
            reason = self._try_fold(bn, graph_outputs)
            if reason:
                skipped[reason] += 1
                logger.debug("BN %s not folded: %s", bn.name, reason)
            else:
                folded += 1
        if folded:
            graph.cleanup()
        return PassResult(graph, folded > 0, {"folded": folded, "skipped": dict(skipped)})

    @staticmethod
    def _try_fold(bn: gs.Node, graph_outputs: set[int]) -> str | None:
        if len(bn.outputs) != 1:
            return "training_mode"
        x = bn.inputs[0]
        if len(x.inputs) != 1 or x.inputs[0].op != "Conv":
            return "not_after_conv"
        conv = x.inputs[0]
        if len(x.outputs) != 1 or id(x) in graph_outputs:
            return "conv_output_shared"
        params = [_const(t) for t in bn.inputs[1:5]]
        w = _const(conv.inputs[1])
        if w is None or any(p is None for p in params):
            return "non_constant"
        if len(conv.inputs[1].outputs) != 1:
            return "shared_weight"
        gamma, beta, mean, var = (p.astype(np.float64) for p in params)
        s = gamma / np.sqrt(var + float(bn.attrs.get("epsilon", 1e-5)))
        out_ch = w.shape[0]
        b = _const(conv.inputs[2]) if len(conv.inputs) > 2 else np.zeros(out_ch, w.dtype)
        if b is None:
            return "non_constant"
        w_new = (w.astype(np.float64) * s.reshape(-1, *([1] * (w.ndim - 1)))).astype(w.dtype)
        b_new = (s * (b.astype(np.float64) - mean) + beta).astype(w.dtype)
        conv.inputs[1].values = w_new
        if len(conv.inputs) > 2 and len(conv.inputs[2].outputs) == 1:
            conv.inputs[2].values = b_new
        else:
            bias = gs.Constant(f"{conv.name}.bias", b_new)
            if len(conv.inputs) > 2:
                conv.inputs[2] = bias
            else:
                conv.inputs.append(bias)
        y = bn.outputs[0]
        bn.outputs.clear()
        conv.outputs[0] = y
        return None
