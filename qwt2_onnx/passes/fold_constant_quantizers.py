"""FoldConstantQuantizersPass: ``Q(constant)`` becomes an integer constant.

Another tool's QDQ model may quantize a weight it saw as an activation (e.g.
onnxruntime's ``quantize_static`` on a model whose weights are ``Constant``
nodes, without its pre-processing)::

    W (constant) ─► QuantizeLinear ─► DequantizeLinear ─► Conv
        becomes
    W_int (constant) ─────────────► DequantizeLinear ─► Conv

The integer values are what the QuantizeLinear computes
(``saturate(round_half_even(x / scale) + zero_point)``, per tensor or per
axis; also onnxruntime's ``com.microsoft`` QuantizeLinear, which its int4
weights use), so the graph computes exactly the same thing; the weight is now
a plain ``DQ(constant)`` that upgrade mode can fold CWAC into.  Runs on the ``onnx.ModelProto`` after ``NormalizePass``.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
from onnx import numpy_helper

from ..quant import integer_range
from . import PassResult


def quantize(x: np.ndarray, scale: np.ndarray, zp: np.ndarray | None, axis: int) -> np.ndarray:
    """QuantizeLinear's arithmetic in numpy, in float32 as onnxruntime computes it (x / scale in float64
    rounds a float32 tie like 66.5 the other way now and then: one code of one of Model Optimizer's
    weights moved a recognizer's Chinese accuracy 2 points); output dtype = the zero point's, uint8
    without one."""
    dtype = zp.dtype if zp is not None else np.dtype(np.uint8)
    lo, hi = integer_range(dtype)
    shape = [1] * x.ndim
    if scale.size > 1:
        shape[axis % x.ndim] = -1
    s = scale.astype(np.float32).reshape(shape)
    z = (zp.astype(np.float64) if zp is not None else np.zeros(1)).reshape(shape if scale.size > 1 else [1] * x.ndim)
    q = np.clip(np.rint(x.astype(np.float32) / s).astype(np.float64) + z, lo, hi)
    return q.astype(ml_dtypes.int4 if dtype.name == "int4" else ml_dtypes.uint4 if dtype.name == "uint4" else dtype)


class FoldConstantQuantizersPass:
    def __call__(self, model: onnx.ModelProto) -> PassResult:
        inits = {t.name: t for t in model.graph.initializer}
        graph_outputs = {o.name for o in model.graph.output}
        keep, folded = [], 0
        for node in model.graph.node:
            if (node.op_type != "QuantizeLinear" or node.output[0] in graph_outputs
                    or not all(i in inits for i in node.input if i)):
                keep.append(node)
                continue
            x, scale = (numpy_helper.to_array(inits[i]) for i in node.input[:2])
            zp = numpy_helper.to_array(inits[node.input[2]]) if len(node.input) > 2 and node.input[2] else None
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            model.graph.initializer.append(numpy_helper.from_array(quantize(x, scale, zp, axis), node.output[0]))
            folded += 1
        if folded:
            del model.graph.node[:]
            model.graph.node.extend(keep)
        return PassResult(model, folded > 0, {"constant_quantizers_folded": folded})
