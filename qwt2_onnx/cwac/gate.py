"""The CWAC output gate, measure and decision: how far a model's outputs are from the float model's
(:func:`output_errors`), and which candidate is kept (:func:`gate_choice`).

``fit_compensations`` scores each candidate (global, local, no compensation)
with :func:`output_errors` on the held-out calibration samples (:class:`Parts`)
and keeps the lowest that the decision veto allows; :func:`gate_given` measures
a compensation fitted elsewhere (``--cwac-params``) the same way.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import onnx

from ..calib_data import CalibrationSet
from ..config import CwacConfig
from ..runtime import batches, make_session, with_outputs
from .closed_form import real_positions
from .fold import unfused_model
from .records import Compensation, CwacFit, OutputError

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
    return [name for name, _, _ in _output_parts(model)]


def sigmoid_logits(model: onnx.ModelProto) -> list[str]:
    """The gate tensors that are the input of a Sigmoid whose output is (part of) a graph output: the
    logits of scores read against a threshold (a detector's class scores, a probability map)."""
    return [name for name, op, _ in _output_parts(model) if op == "Sigmoid"]


def _output_parts(model: onnx.ModelProto) -> list[tuple[str, str | None, int | None]]:
    """(tensor, the Softmax / Sigmoid op it is the input of, else None, that Softmax's axis, else None) for
    each part of each graph output."""
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

    def part(t: str) -> tuple[str, str | None, int | None]:
        # a tool that quantizes the probabilities too (onnxruntime does) ends the graph in Softmax → Q → DQ
        u = under_requantization(t)
        if u in producer and producer[u].op_type in _SATURATING:
            node = producer[u]
            axis = next((a.i for a in node.attribute if a.name == "axis"), -1) if node.op_type == "Softmax" else None
            return node.input[0], node.op_type, axis
        return through_shape_ops(t), None, None

    parts = []
    for out in model.graph.output:
        t = under_requantization(out.name)
        if t in producer and producer[t].op_type == "Concat":
            parts += [part(i) for i in producer[t].input]
        else:
            parts.append(part(out.name))
    return parts


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
    ref_parts, cand_names = _output_parts(float_model), gate_tensors(model)
    ref_names = [name for name, _, _ in ref_parts]
    softmax_axis = [axis for _, _, axis in ref_parts]  # None but on a Softmax (opset 13+: default -1)
    if len(ref_names) != len(cand_names):  # the two graphs' heads differ in form: compare the outputs themselves
        ref_names = cand_names = [o.name for o in float_model.graph.output]
        softmax_axis = [None] * len(ref_names)
    agree = positions = 0
    ref = make_session(with_outputs(float_model, ref_names), optimized=True)
    cand = make_session(with_outputs(model, cand_names), optimized=False)
    err = [0.0] * len(ref_names)
    power = [0.0] * len(ref_names)
    sample_err: list[list[float]] = [[] for _ in ref_names]
    per_sample_axis = True
    for feed, n in batches(data, batch_size):
        mask = feed[position_mask] if position_mask else None
        for i, (r, c) in enumerate(zip(ref.run(ref_names, feed), cand.run(cand_names, feed))):
            pieces = _samples(r, n, mask)
            per_sample_axis &= pieces is not None
            for rows, m in pieces or [(Ellipsis, mask)]:  # each sample's rows, restricted like the whole batch
                _, (rk, ck) = real_positions(m, -1, r[rows], c[rows])
                r64 = rk.astype(np.float64)
                e = float(np.sum((ck.astype(np.float64) - r64) ** 2))
                sample_err[i].append(e)
                err[i] += e
                power[i] += float(np.sum(r64 ** 2))
            if softmax_axis[i] is not None:  # the decision each position's probabilities make
                axis = softmax_axis[i] % r.ndim
                _, (rk, ck) = real_positions(mask, -1, np.moveaxis(r, axis, -1), np.moveaxis(c, axis, -1))
                agree += int(np.sum(rk.argmax(-1) == ck.argmax(-1)))
                positions += int(rk.size // max(rk.shape[-1], 1))
    total = float(sum(e / max(p, 1e-30) for e, p in zip(err, power)))
    decisions = agree / positions if positions else None
    if not per_sample_axis:
        return OutputError(total, None, decisions)
    per_sample = sum(np.asarray(part) / max(p, 1e-30) for part, p in zip(sample_err, power))
    return OutputError(total, np.asarray(per_sample, dtype=np.float64), decisions)


def _samples(t: np.ndarray, n: int, mask: np.ndarray | None) -> list[tuple[slice, np.ndarray | None]] | None:
    """Each of a batch's ``n`` samples as (its rows of ``t``, its row of the mask): ``t``'s leading axis
    holds the samples one after another ([batch, ...] or [batch·seq, ...]); None when it does not."""
    if t.ndim == 0 or t.shape[0] % n:
        return None
    rows = t.shape[0] // n
    return [(slice(k * rows, (k + 1) * rows), None if mask is None else mask[k:k + 1]) for k in range(n)]


# The fit and its gate run one sample per onnxruntime call, whatever --batch-size says, so that the model
# they write does not depend on batching: onnxruntime's MatMul on a weight that is not a constant (a
# DequantizeLinear output, in every float-simulated QDQ graph) rounds differently for one row and for many
# (orientation's classifier MatMul: 5.5e-6 between a batch of 8 and 8 single runs, enough to move its
# fitted gains in the 7th digit).  Measured cost on orientation (48 samples, 2 cores under a load of ~6,
# two runs each): fit 18.4 s / 15.1 s one sample per call vs 15.0 s / 15.9 s in batches of 8 — within the
# machine's noise.
FIT_BATCH = 1


@dataclasses.dataclass
class Parts:
    """The fit part and the held-out part of the calibration set (streamed, not stored)."""

    fit: CalibrationSet
    hold: CalibrationSet
    batch_size: int

    @classmethod
    def split(cls, data: CalibrationSet, cfg: CwacConfig, batch_size: int) -> "Parts":
        n = data.length if data.length is not None else sum(1 for _ in data)
        n_hold = max(1, int(round(n * cfg.holdout_fraction))) if n >= 4 else 0
        hold = data.take(n - n_hold, n) if n_hold else data.take(0, n)
        return cls(data.take(0, n - n_hold), hold, batch_size)


def gate_given(float_model: onnx.ModelProto, qmodel: onnx.ModelProto, comps: dict[str, Compensation],
               data: CalibrationSet, cfg: CwacConfig = CwacConfig(), batch_size: int = 8) -> CwacFit:
    """Compensation fitted elsewhere (``--cwac-params``) measured by the same output gate as a fitted one,
    on the held-out part of the calibration set.  It is folded as asked — the user gave it explicitly —
    but the record carries both held-out errors and decision agreements, and ``gate_choice``'s verdict
    (``rejected_by_gate``), which the compile summary prints as a warning: a zero or absurd gain no
    longer passes silently."""
    t0 = time.perf_counter()
    parts = Parts.split(data, cfg, FIT_BATCH)
    scored = {"none": output_errors(float_model, qmodel, parts.hold, parts.batch_size, cfg.position_mask)}
    if comps:
        scored["params"] = output_errors(float_model, unfused_model(qmodel, comps), parts.hold, parts.batch_size,
                                         cfg.position_mask)
    best, vetoed = gate_choice(scored)
    decisions = {t: e.decisions for t, e in scored.items() if e.decisions is not None}
    return CwacFit(comps, "params", [], {t: e.total for t, e in scored.items()}, 0, time.perf_counter() - t0,
                   decisions=decisions, vetoed=vetoed, rejected_by_gate=bool(comps) and best != "params")


def gate_choice(scored: dict[str, OutputError]) -> tuple[str, list[str]]:
    """The output gate: the candidate with the lowest held-out output error (no compensation on a tie),
    among those not vetoed, and the vetoed.  Vetoed is a candidate whose held-out decisions (argmax of
    the Softmax outputs) agree with float's less often than no compensation's do: a lower output error
    can still change decisions (an upgraded recognizer's logit error halved while a third of its Chinese
    characters changed), and a decision is what a classifier's user sees."""
    base = scored["none"].decisions
    vetoed = [] if base is None else [t for t, e in scored.items()
                                      if t != "none" and e.decisions is not None and e.decisions < base]
    best = min((t for t in scored if t not in vetoed), key=lambda t: (scored[t].total, t != "none"))
    return best, vetoed
