"""TrtLintPass: refuse to write a graph TensorRT would reject.

TensorRT's explicit-quantization rules checked here, on every Q/DQ node:

* the quantized type is int8 (or int4 for weights) and every zero point is 0;
* scales are finite and strictly positive;
* per-axis scales only on DequantizeLinear of constant weights; activation
  Q/DQ are per-tensor;
* no int32 DequantizeLinear (a quantized bias): biases stay float.

The pass does not modify the graph; its stats list the violations.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from . import PassResult


def _violations(node: gs.Node) -> list[str]:
    out = []
    data, scale = node.inputs[0], node.inputs[1]
    zp = node.inputs[2] if len(node.inputs) > 2 else None
    qtensor = data if node.op == "DequantizeLinear" else (node.outputs[0] if zp is None else zp)
    qdtype = np.dtype(zp.values.dtype) if isinstance(zp, gs.Constant) else getattr(qtensor, "dtype", None)
    if qdtype is not None and np.dtype(qdtype).name not in ("int8", "int4"):
        out.append(f"{node.name}: quantized type {np.dtype(qdtype).name} (TensorRT needs int8/int4)")
    if isinstance(zp, gs.Constant) and np.any(np.asarray(zp.values).astype(np.int64) != 0):
        out.append(f"{node.name}: non-zero zero point")
    if not isinstance(scale, gs.Constant):
        out.append(f"{node.name}: scale is not a constant")
        return out
    s = np.asarray(scale.values, np.float64)
    if not np.all(np.isfinite(s)) or np.any(s <= 0):
        out.append(f"{node.name}: scale not finite and positive (min {s.min():.3g})")
    if s.size > 1 and not (node.op == "DequantizeLinear" and isinstance(data, gs.Constant)):
        out.append(f"{node.name}: per-axis scale on an activation")
    return out


class TrtLintPass:
    def __call__(self, graph: gs.Graph) -> PassResult:
        problems: list[str] = []
        for node in graph.nodes:
            if node.op in ("QuantizeLinear", "DequantizeLinear"):
                problems += _violations(node)
        return PassResult(graph, False, {"violations": problems})
