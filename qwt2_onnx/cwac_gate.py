"""The CWAC output gate's measure: how far a model's outputs are from the float model's.

``fit_compensations`` scores each candidate (global, local, no compensation)
with :func:`output_error` on the held-out calibration samples and keeps the
lowest.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx

from .calib_data import CalibrationSet
from .cwac import real_positions
from .runtime import batches, make_session, with_outputs

_SATURATING = ("Softmax", "Sigmoid", "LogSoftmax")
SHAPE_ONLY = ("Identity", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten")


def gate_tensors(model: onnx.ModelProto) -> list[str]:
    """What the output gate compares: each graph output, split into its parts where it is a Concat (YOLO
    heads concatenate box coordinates in pixels with class scores in [0, 1]: judged as one tensor, the
    boxes' error would drown the scores'), and each part taken before a Softmax / Sigmoid (up to reshapes).
    A saturated probability hides the error of every confidently classified sample, so on a small held-out
    set the output error would rest on one or two samples; the logits carry all of them.  Each model is
    asked separately (another tool may have renamed the logits, e.g. to the output of a
    DequantizeLinear); the lists pair up by position (see :func:`output_error`)."""
    return [name for name, _ in _output_parts(model)]


def sigmoid_logits(model: onnx.ModelProto) -> list[str]:
    """The gate tensors that are the input of a Sigmoid whose output is (part of) a graph output: the
    logits of scores read against a threshold (a detector's class scores, a probability map)."""
    return [name for name, op in _output_parts(model) if op == "Sigmoid"]


def _output_parts(model: onnx.ModelProto) -> list[tuple[str, str | None]]:
    """(tensor, the Softmax / Sigmoid op it is the input of, else None) for each part of each graph output."""
    producer = {o: n for n in model.graph.node for o in n.output}

    def through_shape_ops(t: str) -> str:
        while t in producer and producer[t].op_type in SHAPE_ONLY:
            t = producer[t].input[0]
        return t

    def under_requantization(t: str) -> str:
        """The float tensor a QuantizeLinear → DequantizeLinear pair (and reshapes) re-expresses, else ``t``."""
        t = through_shape_ops(t)
        while (t in producer and producer[t].op_type == "DequantizeLinear" and producer[t].input[0] in producer
               and producer[producer[t].input[0]].op_type == "QuantizeLinear"):
            t = through_shape_ops(producer[producer[t].input[0]].input[0])
        return t

    def part(t: str) -> tuple[str, str | None]:
        # a tool that quantizes the probabilities too (onnxruntime does) ends the graph in Softmax → Q → DQ
        u = under_requantization(t)
        if u in producer and producer[u].op_type in _SATURATING:
            return producer[u].input[0], producer[u].op_type
        return through_shape_ops(t), None

    parts = []
    for out in model.graph.output:
        t = under_requantization(out.name)
        if t in producer and producer[t].op_type == "Concat":
            parts += [part(i) for i in producer[t].input]
        else:
            parts.append(part(out.name))
    return parts


@dataclasses.dataclass
class OutputError:
    """The output gate's score of one model on ``data``: ``total`` (what the gate ranks by) and each
    sample's share of it, ``per_sample`` (they sum to ``total``; None where an output has no per-sample
    leading axis)."""

    total: float
    per_sample: np.ndarray | None


def output_error(float_model: onnx.ModelProto, model: onnx.ModelProto, data: CalibrationSet, batch_size: int,
                 position_mask: str | None = None) -> float:
    """Σ over :func:`gate_tensors` of MSE(model, float) / mean(float²), simulated, on ``data``: every output
    part weighs the same whatever its units.  ``position_mask`` (an input's name): tensors laid out
    [batch, seq, ...] count only the positions it marks real (``cwac.real_positions``)."""
    return output_errors(float_model, model, data, batch_size, position_mask).total


def output_errors(float_model: onnx.ModelProto, model: onnx.ModelProto, data: CalibrationSet, batch_size: int,
                  position_mask: str | None = None) -> OutputError:
    """:func:`output_error`, with each sample's share: Σ over parts of that sample's squared error / the
    part's power over all of ``data``."""
    ref_names, cand_names = gate_tensors(float_model), gate_tensors(model)
    if len(ref_names) != len(cand_names):  # the two graphs' heads differ in form: compare the outputs themselves
        ref_names = cand_names = [o.name for o in float_model.graph.output]
    ref = make_session(with_outputs(float_model, ref_names), optimized=True)
    cand = make_session(with_outputs(model, cand_names), optimized=False)
    err = [0.0] * len(ref_names)
    power = [0.0] * len(ref_names)
    sample_err: list[list[np.ndarray | None]] = [[] for _ in ref_names]
    for feed, n in batches(data, batch_size):
        mask = feed[position_mask] if position_mask else None
        for i, (r, c) in enumerate(zip(ref.run(ref_names, feed), cand.run(cand_names, feed))):
            sq = (c.astype(np.float64) - r.astype(np.float64)) ** 2
            sample_err[i].append(_per_sample(sq, n, mask))
            _, (r, c) = real_positions(mask, -1, r, c)
            r64, c64 = r.astype(np.float64), c.astype(np.float64)
            err[i] += float(np.sum((c64 - r64) ** 2))
            power[i] += float(np.sum(r64 ** 2))
    total = float(sum(e / max(p, 1e-30) for e, p in zip(err, power)))
    if any(s is None for part in sample_err for s in part):
        return OutputError(total, None)
    per_sample = sum(np.concatenate(part) / max(p, 1e-30) for part, p in zip(sample_err, power))
    return OutputError(total, np.asarray(per_sample, dtype=np.float64))


def _per_sample(sq: np.ndarray, n: int, mask: np.ndarray | None) -> np.ndarray | None:
    """Each of a batch's ``n`` samples' Σ of ``sq`` (squared errors laid out like the output), over the
    positions :func:`cwac.real_positions` would keep; None when the leading axis is not per sample."""
    if sq.ndim == 0 or sq.shape[0] % n:
        return None
    if mask is not None and sq.ndim >= 2:
        keep = mask != 0
        if sq.ndim >= 3 and sq.shape[:2] == mask.shape:
            return (sq.reshape(*mask.shape, -1).sum(-1) * keep).sum(1)
        if sq.shape[0] == mask.size:
            return (sq.reshape(sq.shape[0], -1).sum(1) * keep.ravel()).reshape(n, -1).sum(1)
    return sq.reshape(n, -1).sum(1)
