"""NormalizePass: make a real-world export uniform before anything else runs.

On the ``onnx.ModelProto`` (before the graph is imported to graphsurgeon):

1. every node gets a stable, unique name (``<OpType>_<index>`` when unnamed),
   so float and quantized graphs can be matched by name later;
2. ``Constant`` nodes of the main graph become initializers;
3. initializers listed as graph inputs (old IR < 4 habit) stop being inputs;
4. the default-domain opset is raised to ``min_opset`` when lower
   (per-channel Q/DQ needs 13, int4 needs 21), and the IR version with it;
5. shape inference runs when it can; symbolic or unknown dimensions are fine.
"""
from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper

from ..errors import QwtError
from . import PassResult
from .float32 import Float32Pass

logger = logging.getLogger(__name__)

_MIN_IR = {21: 10, 13: 7}


def default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 1


def _constant_value(node: onnx.NodeProto) -> onnx.TensorProto | None:
    attr = node.attribute[0] if len(node.attribute) == 1 else None
    if attr is None:
        return None
    name = node.output[0]
    if attr.name == "sparse_value":
        t = _dense(attr.sparse_tensor)
        t.name = name
        return t
    if attr.name == "value":
        t = onnx.TensorProto()
        t.CopyFrom(attr.t)
        t.name = name
        return t
    scalars = {"value_float": (onnx.TensorProto.FLOAT, [attr.f], []),
               "value_int": (onnx.TensorProto.INT64, [attr.i], []),
               "value_floats": (onnx.TensorProto.FLOAT, list(attr.floats), [len(attr.floats)]),
               "value_ints": (onnx.TensorProto.INT64, list(attr.ints), [len(attr.ints)])}
    if attr.name in scalars:
        dtype, vals, dims = scalars[attr.name]
        return helper.make_tensor(name, dtype, dims, vals)
    return None


def _dense(sparse: onnx.SparseTensorProto) -> onnx.TensorProto:
    """A sparse tensor's dense equivalent (same name, type and values)."""
    values = onnx.numpy_helper.to_array(sparse.values)
    indices = onnx.numpy_helper.to_array(sparse.indices).astype(np.int64)
    dims = tuple(sparse.dims)
    dense = np.zeros(dims, dtype=values.dtype)
    if indices.ndim == 2:  # [NNZ, rank] coordinates
        indices = np.ravel_multi_index(tuple(indices.T), dims) if indices.size else indices.reshape(-1)
    dense.reshape(-1)[indices] = values
    return onnx.numpy_helper.from_array(dense, sparse.values.name)


def constants_to_initializers(model: onnx.ModelProto) -> int:
    """Move the main graph's ``Constant`` nodes (not graph outputs) and sparse initializers into dense
    initializers, in place; returns how many moved (the function the graph computes is unchanged)."""
    graph_outputs = {o.name for o in model.graph.output}
    keep, moved = [], 0
    for sparse in model.graph.sparse_initializer:
        model.graph.initializer.append(_dense(sparse))
        moved += 1
    model.graph.ClearField("sparse_initializer")
    for node in model.graph.node:
        tensor = None
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output[0] not in graph_outputs:
            tensor = _constant_value(node)
        if tensor is None:
            keep.append(node)
            continue
        model.graph.initializer.append(tensor)
        moved += 1
    if moved:
        del model.graph.node[:]
        model.graph.node.extend(keep)
    return moved


def broadcast_gemm_biases(model: onnx.ModelProto) -> int:
    """Give every Gemm whose constant bias C broadcasts along the output channels (shape [1], [], [1, N])
    a bias of shape [N], in place, so the bias can carry one value per channel (CWAC folds into it);
    returns how many.  The values the Gemm adds are unchanged."""
    inits = {t.name: t for t in model.graph.initializer}
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    changed = 0
    for node in model.graph.node:
        if node.op_type != "Gemm" or len(node.input) < 3 or node.input[2] not in inits or node.input[1] not in inits:
            continue
        c, w = inits[node.input[2]], inits[node.input[1]]
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        if len(w.dims) != 2 or (len(c.dims) == 1 and c.dims[0] == w.dims[0 if trans_b else 1]):
            continue
        n = int(w.dims[0 if trans_b else 1])
        values = onnx.numpy_helper.to_array(c)
        if values.size not in (1, n) or (values.ndim == 2 and values.shape[0] != 1) or values.ndim > 2:
            continue  # a bias per row (batch) is not a per-channel bias: the policy leaves such a Gemm float
        name = c.name if readers.get(c.name, 0) == 1 else f"{c.name}_{node.name}_per_channel"
        new = onnx.numpy_helper.from_array(np.broadcast_to(values.reshape(-1), (n,)).copy(), name)
        if name == c.name:
            c.CopyFrom(new)
        else:
            model.graph.initializer.append(new)
            node.input[2] = name
        changed += 1
    return changed


class NormalizePass:
    def __init__(self, min_opset: int = 13):
        self.min_opset = min_opset

    def __call__(self, model: onnx.ModelProto) -> PassResult:
        stats = {"renamed_nodes": self._name_nodes(model),
                 "constants_to_initializers": constants_to_initializers(model),
                 "initializer_inputs_removed": self._drop_initializer_inputs(model),
                 "gemm_biases_broadcast": broadcast_gemm_biases(model)}
        float32 = Float32Pass()(model).stats
        if float32:
            stats["float32_inside"] = float32
        stats["opset"] = self._upgrade_opset(model)
        if "->" in stats["opset"]:  # the version converter writes Clip bounds, Pad pads... as Constant nodes
            stats["constants_to_initializers"] += constants_to_initializers(model)
        model = self._infer_shapes(model, stats)
        modified = any(v for k, v in stats.items() if k not in ("opset", "shape_inference"))
        return PassResult(model, modified, stats)

    @staticmethod
    def _name_nodes(model: onnx.ModelProto) -> int:
        """Give unnamed or duplicate-named nodes a unique ``<OpType>_<index>`` name."""
        all_names = {n.name for n in model.graph.node if n.name}
        seen: set[str] = set()
        renamed = 0
        for i, node in enumerate(model.graph.node):
            if node.name and node.name not in seen:
                seen.add(node.name)
                continue
            base = f"{node.op_type}_{i}"
            name, k = base, 0
            while name in all_names or name in seen:
                k += 1
                name = f"{base}_{k}"
            node.name = name
            seen.add(name)
            renamed += 1
        return renamed

    @staticmethod
    def _drop_initializer_inputs(model: onnx.ModelProto) -> int:
        if model.ir_version < 4:
            return 0
        inits = {i.name for i in model.graph.initializer}
        inputs = [i for i in model.graph.input if i.name not in inits]
        dropped = len(model.graph.input) - len(inputs)
        if dropped:
            del model.graph.input[:]
            model.graph.input.extend(inputs)
        return dropped

    def _upgrade_opset(self, model: onnx.ModelProto) -> str:
        current = default_opset(model)
        if current >= self.min_opset:
            return str(current)
        try:
            converted = onnx.version_converter.convert_version(model, self.min_opset)
        except Exception as e:
            raise QwtError(
                f"could not upgrade the model from opset {current} to {self.min_opset}",
                notes=[f"{type(e).__name__}: {str(e)[:300]}",
                       "per-channel Q/DQ needs opset >= 13, int4 needs opset >= 21"],
                fix="re-export the model with a newer opset (e.g. torch.onnx.export(..., opset_version=17))",
            ) from None
        model.CopyFrom(converted)
        for opset, ir in _MIN_IR.items():
            if self.min_opset >= opset and model.ir_version < ir:
                model.ir_version = ir
                break
        logger.info("opset upgraded %d -> %d", current, self.min_opset)
        return f"{current}->{self.min_opset}"

    @staticmethod
    def _infer_shapes(model: onnx.ModelProto, stats: dict) -> onnx.ModelProto:
        """Shapes inferred on the model's structure: initializers of 1 KiB or more (weights) enter as typed
        graph inputs, so the weights are never copied (and models over 2 GB work); small ones (shape
        constants) keep their values for data propagation.  The inferred value_info goes back into ``model``."""
        from ..proto import structure

        probe = structure(model)
        try:
            inferred = onnx.shape_inference.infer_shapes(probe, strict_mode=False, data_prop=True)
            del model.graph.value_info[:]
            model.graph.value_info.extend(inferred.graph.value_info)
            stats["shape_inference"] = "ok"
            return model
        except Exception as e:  # shape inference is a help, never a requirement
            logger.info("shape inference skipped: %s", str(e)[:200])
            stats["shape_inference"] = f"skipped: {type(e).__name__}"
            return model

