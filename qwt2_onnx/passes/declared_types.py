"""Repair what a model *declares* about its tensors before anything trusts it.

Shipped models often declare graph-output types that are wrong or incomplete: a
rank-0 output that really is rank 3, a type with no shape at all, a fixed size
that is really dynamic, stale ``value_info`` left behind by an exporter's
optimizer.  onnxruntime only warns about them, but onnx's full check (the last
stage, on the compiled model) rejects them, and onnxruntime fails once an
inserted node writes such an output.  So at load, before calibration:

* a ``value_info`` entry that contradicts what onnx infers from the graph is
  dropped (normalize infers it again); entries that agree, or that know more
  than inference does, are kept;
* each graph output's declared type is compared with the type onnx infers from
  the graph (the declarations removed first, so they cannot steer it).  A declaration is kept when it agrees: same element type, same rank, and
  no dimension where both sides are numbers that differ.  Otherwise — or where
  the declaration has no shape, or declares a number where the graph computes a
  symbolic dimension — the inferred type replaces it, and the repair is
  reported.  Where inference knows nothing about an output the declaration is
  left as it is (onnx's checker then judges it at load);
* once the calibration data is checked, the model runs on its first sample
  (:func:`repair_from_run`) and any output whose declaration contradicts what
  it really returned (rank, a fixed size, the element type) is declared
  again: the element type it returned and, where the rank was wrong, every
  dimension symbolic — what inference could not see (a Reshape to a shape
  computed at run time) the run shows.

The graph the model computes is unchanged; only declarations are rewritten.
"""
from __future__ import annotations

import logging

import onnx

logger = logging.getLogger(__name__)


def _dims(tt: onnx.TypeProto.Tensor) -> list[int | str | None] | None:
    """Declared dims: ints, names of symbolic dims, None where unknown (inference's ``unk__N`` included)."""
    if not tt.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else
            (d.dim_param if d.dim_param and not d.dim_param.startswith("unk__") else None) for d in tt.shape.dim]


def _disagree(declared: onnx.TypeProto.Tensor, inferred: onnx.TypeProto.Tensor) -> str | None:
    """Why the declared tensor type cannot stand beside the inferred one (None: it can)."""
    if inferred.elem_type and declared.elem_type != inferred.elem_type:
        return f"element type {declared.elem_type} but the graph computes {inferred.elem_type}"
    d, i = _dims(declared), _dims(inferred)
    if i is None:
        return None
    if d is None:
        return "no shape"
    if len(d) != len(i):
        return f"rank {len(d)} but the graph computes rank {len(i)}"
    for axis, (a, b) in enumerate(zip(d, i)):
        if isinstance(a, int) and isinstance(b, int) and a != b:
            return f"dimension {axis} = {a} but the graph computes {b}"
        if isinstance(a, int) and isinstance(b, str):
            return f"dimension {axis} fixed at {a} but the graph computes a dynamic '{b}'"
    return None


def repair_declared_types(model: onnx.ModelProto) -> list[str]:
    """Repair ``model``'s graph-output declarations in place (see module doc); one line per repair."""
    from ..proto import structure

    repairs = []
    probe = structure(model)
    del probe.graph.value_info[:]  # the declarations must not steer the inference that judges them
    for out in probe.graph.output:
        if out.type.HasField("tensor_type"):
            out.type.tensor_type.ClearField("shape")
    try:
        inferred = onnx.shape_inference.infer_shapes(probe, strict_mode=False, data_prop=True)
    except Exception as e:  # noqa: BLE001  (inference is a help; the checker judges the model next)
        logger.info("output types not checked: shape inference failed: %s", str(e)[:200])
        return repairs
    found = {vi.name: vi.type for vi in [*inferred.graph.value_info, *inferred.graph.output]}
    kept = [vi for vi in model.graph.value_info if not (
        vi.type.HasField("tensor_type") and vi.name in found and found[vi.name].HasField("tensor_type")
        and _disagree(vi.type.tensor_type, found[vi.name].tensor_type))]
    if len(kept) < len(model.graph.value_info):
        repairs.append(f"{len(model.graph.value_info) - len(kept)} value_info entries contradicted the graph: "
                       "dropped")
        del model.graph.value_info[:]
        model.graph.value_info.extend(kept)
    for out in model.graph.output:
        itype = found.get(out.name)
        if not out.type.HasField("tensor_type") or itype is None or not itype.HasField("tensor_type"):
            continue
        why = _disagree(out.type.tensor_type, itype.tensor_type)
        if why is None:
            continue
        elem = itype.tensor_type.elem_type or out.type.tensor_type.elem_type
        out.type.CopyFrom(itype)
        out.type.tensor_type.elem_type = elem
        repairs.append(f"graph output '{out.name}' was declared with {why}: declaration repaired")
        logger.info(repairs[-1])
    return repairs


def repair_from_run(model: onnx.ModelProto, values: list | None) -> list[str]:
    """Repair, in place, the graph-output declarations that contradict what ``model`` returned (``values``,
    one per graph output, in order; see module doc); one line per repair.  ``values`` None (the model did
    not run: the calibrate stage reports that) repairs nothing."""
    import numpy as np

    if values is None:
        return []
    repairs = []
    for out, value in zip(model.graph.output, values):
        tt = out.type.tensor_type
        if not out.type.HasField("tensor_type"):
            continue
        value = np.asarray(value)
        dims, got = _dims(tt), value.shape
        elem = onnx.helper.np_dtype_to_tensor_dtype(value.dtype)
        wrong_rank = dims is None or len(dims) != len(got)
        wrong_size = not wrong_rank and any(isinstance(d, int) and d != g for d, g in zip(dims, got))
        if not (wrong_rank or wrong_size or tt.elem_type != elem):
            continue
        declared = "no shape" if dims is None else str([d if d is not None else "?" for d in dims])
        new = [f"{out.name}_dim{axis}" if wrong_rank or (isinstance(d, int) and d != g) else d
               for axis, (d, g) in enumerate(zip(dims if not wrong_rank else [None] * len(got), got))]
        out.type.CopyFrom(onnx.helper.make_tensor_type_proto(elem, new))
        repairs.append(f"graph output '{out.name}' was declared {declared} of type {tt.elem_type} but the model "
                       f"returns {list(got)} of type {elem}: declaration repaired")
        logger.info(repairs[-1])
    return repairs
