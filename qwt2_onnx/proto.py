"""ModelProto helpers that do not touch files: its size, and light copies of its structure (no weights) that
onnx's shape inference and checker can read whatever the model's size; ``write_external`` writes the
>2 GB form.  A leaf module.
"""
from __future__ import annotations

import os

import onnx

PROTOBUF_LIMIT = 2**31 - 1


def serialized_size(model: onnx.ModelProto) -> int:
    """The model's serialized size in bytes; protobuf's own ``ByteSize()`` raises above 2 GB, so the parts
    are summed (each under the limit), plus a few bytes of framing per part."""
    g = model.graph
    parts = [*g.initializer, *g.node, *g.value_info, *g.input, *g.output, *model.functions,
             *model.metadata_props, *model.opset_import]
    return sum(p.ByteSize() + 8 for p in parts) + 1024


def structure(model: onnx.ModelProto, inline_below: int = 1024) -> onnx.ModelProto:
    """:func:`skeleton` plus the initializers: those under ``inline_below`` bytes (shape constants) with their
    values, larger ones (weights) as typed graph inputs, so shape inference and onnx's checker can read the
    graph without copying its weights (models over 2 GB included)."""
    light = skeleton(model)
    declared = {i.name for i in light.graph.input}
    for t in model.graph.initializer:
        if t.ByteSize() < inline_below:
            light.graph.initializer.append(t)
        elif t.name not in declared:
            light.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return light


def skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` without its initializers (nodes, inputs, outputs, value_info, opsets, metadata)."""
    graph = model.graph
    light = onnx.ModelProto(ir_version=model.ir_version, opset_import=model.opset_import,
                            producer_name=model.producer_name, producer_version=model.producer_version,
                            domain=model.domain, model_version=model.model_version, doc_string=model.doc_string,
                            metadata_props=model.metadata_props, functions=model.functions)
    g = light.graph
    g.name, g.doc_string = graph.name, graph.doc_string
    g.node.extend(graph.node)
    g.input.extend(graph.input)
    g.output.extend(graph.output)
    g.value_info.extend(graph.value_info)
    g.sparse_initializer.extend(graph.sparse_initializer)
    return light


def write_external(model: onnx.ModelProto, path: str, inline_below: int = 1024) -> None:
    """Write ``model`` with every initializer of ``inline_below`` bytes or more in ``PATH.data``, one tensor at
    a time: unlike ``onnx.save_model(save_as_external_data=True)`` this neither copies nor modifies the
    in-memory model, so a model near the memory limit can still be written."""
    data_name = os.path.basename(path) + ".data"
    graph = model.graph
    light = skeleton(model)
    g = light.graph
    offset = 0
    with open(os.path.join(os.path.dirname(path), data_name), "wb") as f:
        for t in graph.initializer:
            if t.data_type == onnx.TensorProto.STRING:  # strings have no raw bytes to move
                g.initializer.append(t)
                continue
            raw = t.raw_data if t.HasField("raw_data") else onnx.numpy_helper.to_array(t).tobytes()
            if len(raw) < inline_below:
                g.initializer.append(t)
                continue
            pad = (-offset) % 4096  # aligned, as onnxruntime can then map it
            f.write(b"\0" * pad)
            offset += pad
            f.write(raw)
            stub = g.initializer.add()
            stub.name, stub.data_type = t.name, t.data_type
            stub.dims.extend(t.dims)
            stub.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(len(raw)))):
                entry = stub.external_data.add()
                entry.key, entry.value = key, value
            offset += len(raw)
    if offset == 0:  # every tensor stayed inline
        os.remove(os.path.join(os.path.dirname(path), data_name))
    with open(path, "wb") as f:
        f.write(light.SerializeToString(deterministic=True))
