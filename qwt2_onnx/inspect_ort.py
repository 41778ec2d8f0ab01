"""What onnxruntime makes of a QDQ model: which layers run as integer kernels.

We let onnxruntime optimize the model (ORT_ENABLE_ALL, CPU) and save its
optimized graph, then look for each planned layer: a layer is *integer* when
its name survives on an integer kernel (QLinearConv, QGemm, QLinearMatMul,
MatMulIntegerToFloat, ...) or when no float node of that name is left and an
integer kernel consumed its weight.  Everything else stays float, with the
reason we can tell.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from collections import Counter

import onnx
import onnxruntime as ort

from .model_io import runnable

INTEGER_KERNELS = {"QLinearConv", "QGemm", "QLinearMatMul", "MatMulIntegerToFloat", "ConvInteger",
                   "MatMulInteger", "QLinearConvTranspose", "DynamicQuantizeMatMul"}
FLOAT_LAYERS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul", "NchwcConv"}


@dataclasses.dataclass
class FusionReport:
    integer: dict[str, str]  # layer -> kernel
    float_: dict[str, str]   # layer -> reason
    op_histogram: dict[str, int]

    def summary(self) -> str:
        kernels = Counter(self.integer.values())
        parts = ", ".join(f"{k}×{v}" for k, v in sorted(kernels.items())) or "none"
        return f"{len(self.integer)}/{len(self.integer) + len(self.float_)} layers on integer kernels ({parts})"


def optimized_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "optimized.onnx")
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.optimized_model_filepath = path
        so.log_severity_level = 3
        with runnable(model) as src:
            ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
        return onnx.load(path, load_external_data=False)  # the structure is what is inspected


def fusion_report(model: onnx.ModelProto, layers: dict[str, str]) -> FusionReport:
    """``layers``: planned layer name -> its integer weight tensor's name."""
    opt = optimized_graph(model)
    by_name = {n.name: n for n in opt.graph.node}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in opt.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    integer, float_ = {}, {}
    for layer, weight in layers.items():
        node = by_name.get(layer)
        if node is not None and node.op_type in INTEGER_KERNELS:
            integer[layer] = node.op_type
            continue
        readers = consumers.get(weight, [])
        kernel = next((r.op_type for r in readers if r.op_type in INTEGER_KERNELS), None)
        if kernel and (node is None or node.op_type not in FLOAT_LAYERS):
            integer[layer] = kernel
        elif node is not None and node.op_type in FLOAT_LAYERS:
            float_[layer] = f"runs as float {node.op_type} (no integer kernel matched its Q/DQ pattern)"
        else:
            float_[layer] = "float (weight dequantized at load time)"
    return FusionReport(integer, float_, dict(Counter(n.op_type for n in opt.graph.node)))
