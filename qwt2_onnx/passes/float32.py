"""Float32Pass: compute in float32 inside, keep the model's own input and output types.

Quantization parameters, observers and the CWAC fit all work in float32, and
onnxruntime's QuantizeLinear takes float32 (not float64, and float16 only from
opset 19).  A float16, bfloat16 or float64 model, or a float32 model whose
weights are stored in bfloat16 or float16 behind a ``Cast``, is therefore made
float32 inside, on the ``onnx.ModelProto`` before import:

* every initializer of those types (and the value of a ``ConstantOfShape``)
  becomes float32 (bfloat16 and float16 convert exactly; float64 rounds);
* every ``Cast`` / ``EyeLike`` / random-op target of those types becomes float32;
* a graph input of those types is cast to float32 right after it enters
  (``x ─► Cast(to=float) ─► x_float32``), and a graph output is cast back to its
  declared type right before it leaves, so the model keeps its interface: the
  same feeds, the same output types.

Subgraphs (If / Loop / Scan bodies) are converted the same way.  The stats
count what changed per source type; nothing changes on a float32 model.
"""
from __future__ import annotations

import collections
import logging

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from . import PassResult

logger = logging.getLogger(__name__)

WIDE_OR_NARROW = {TensorProto.FLOAT16: "float16", TensorProto.BFLOAT16: "bfloat16", TensorProto.DOUBLE: "float64"}
_TYPE_ATTRS = {"Cast": "to", "EyeLike": "dtype", "RandomNormal": "dtype", "RandomUniform": "dtype",
               "RandomNormalLike": "dtype", "RandomUniformLike": "dtype", "Multinomial": "dtype"}


def _as_float32(t: onnx.TensorProto) -> onnx.TensorProto:
    if t.data_type == TensorProto.BFLOAT16:  # numpy has no bfloat16: read the raw 16-bit patterns
        if t.HasField("raw_data"):
            bits = np.frombuffer(t.raw_data, np.uint16)
        else:
            bits = np.asarray(t.int32_data, np.uint32).astype(np.uint16)
        values = bits.view(ml_dtypes.bfloat16).astype(np.float32).reshape(tuple(t.dims))
    else:
        values = numpy_helper.to_array(t).astype(np.float32)
    return numpy_helper.from_array(values, t.name)


class Float32Pass:
    def __call__(self, model: onnx.ModelProto) -> PassResult:
        counts: collections.Counter = collections.Counter()
        self._graph(model.graph, counts)
        self._interface(model.graph, counts)
        if counts:
            logger.info("computing in float32 inside: %s", dict(counts))
        return PassResult(model, bool(counts), {k: v for k, v in sorted(counts.items())})

    def _graph(self, graph: onnx.GraphProto, counts: collections.Counter) -> None:
        before = sum(counts.values())
        for i, t in enumerate(graph.initializer):
            if t.data_type in WIDE_OR_NARROW:
                counts[f"{WIDE_OR_NARROW[t.data_type]}_initializers"] += 1
                graph.initializer[i].CopyFrom(_as_float32(t))
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    self._graph(attr.g, counts)
                    self._subgraph_interface(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for g in attr.graphs:
                        self._graph(g, counts)
                        self._subgraph_interface(g)
                elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type in WIDE_OR_NARROW:
                    counts[f"{WIDE_OR_NARROW[attr.t.data_type]}_attribute_tensors"] += 1
                    attr.t.CopyFrom(_as_float32(attr.t))
                elif attr.name == _TYPE_ATTRS.get(node.op_type) and attr.i in WIDE_OR_NARROW:
                    counts[f"{WIDE_OR_NARROW[attr.i]}_{node.op_type.lower()}s"] += 1
                    attr.i = TensorProto.FLOAT
        if sum(counts.values()) > before:  # shapes stay, types changed: normalize infers them again
            graph.ClearField("value_info")

    @staticmethod
    def _subgraph_interface(graph: onnx.GraphProto) -> None:
        for vi in [*graph.input, *graph.output]:
            if vi.type.tensor_type.elem_type in WIDE_OR_NARROW:
                vi.type.tensor_type.elem_type = TensorProto.FLOAT

    @staticmethod
    def _interface(graph: onnx.GraphProto, counts: collections.Counter) -> None:
        """Casts at the graph's inputs and outputs of the converted types (see module doc)."""
        used = {n for node in graph.node for n in [*node.input, *node.output]} | {i.name for i in graph.initializer}
        head, tail = [], []

        def fresh(name: str) -> str:
            new, k = f"{name}_float32", 0
            while new in used:
                k += 1
                new = f"{name}_float32_{k}"
            used.add(new)
            return new

        for vi in graph.input:
            elem = vi.type.tensor_type.elem_type
            if elem not in WIDE_OR_NARROW:
                continue
            inner = fresh(vi.name)
            for node in graph.node:
                node.input[:] = [inner if n == vi.name else n for n in node.input]
            head.append(helper.make_node("Cast", [vi.name], [inner], name=f"{vi.name}_to_float32", to=TensorProto.FLOAT))
            counts[f"{WIDE_OR_NARROW[elem]}_inputs"] += 1
        for out in graph.output:
            elem = out.type.tensor_type.elem_type
            if elem not in WIDE_OR_NARROW or out.name in {vi.name for vi in graph.input}:
                continue  # an input passed straight through keeps its own type
            inner = fresh(out.name)
            for node in graph.node:
                node.output[:] = [inner if n == out.name else n for n in node.output]
                node.input[:] = [inner if n == out.name else n for n in node.input]
            tail.append(helper.make_node("Cast", [inner], [out.name], name=f"{out.name}_from_float32", to=elem))
            counts[f"{WIDE_OR_NARROW[elem]}_outputs"] += 1
        if head or tail:
            nodes = [*head, *graph.node, *tail]
            del graph.node[:]
            graph.node.extend(nodes)
