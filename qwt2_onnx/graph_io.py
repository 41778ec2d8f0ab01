"""The one way out of graphsurgeon: ``export_model``.

onnx-graphsurgeon cannot write 4-bit (INT4/UINT4) constants: it stores one
byte per element, which onnx refuses ("Raw data size does not match").
``export_model`` hands such constants to graphsurgeon as 8-bit and converts
the exported initializers to packed 4-bit, as the ONNX spec stores them.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs

_WIDEN = {"int4": np.int8, "uint4": np.uint8}
_NARROW = {"int4": ml_dtypes.int4, "uint4": ml_dtypes.uint4}


def export_model(graph: gs.Graph) -> onnx.ModelProto:
    four_bit: dict[str, str] = {}
    for t in graph.tensors().values():
        if isinstance(t, gs.Constant) and np.dtype(t.dtype).name in _WIDEN:
            kind = np.dtype(t.dtype).name
            t.values = np.asarray(t.values).astype(_WIDEN[kind])
            four_bit[t.name] = kind
    model = gs.export_onnx(graph)
    for init in model.graph.initializer:
        if init.name in four_bit:
            vals = onnx.numpy_helper.to_array(init).astype(_NARROW[four_bit[init.name]])
            init.CopyFrom(onnx.numpy_helper.from_array(vals, init.name))
    for t in graph.tensors().values():  # the graph object keeps its 4-bit types
        if t.name in four_bit:
            t.values = np.asarray(t.values).astype(_NARROW[four_bit[t.name]])
    return model
