"""Fused vs unfused CWAC graphs: do they compute the same function?

The fold changes only weight DQ scales, integer weight signs and biases, so
the two graphs differ by float rounding (~1e-7 relative per layer).  In a
graph with activation quantizers, such a difference flips the rounding of
the rare activation that lies within rounding distance of a .5 tie; one
flipped code (1 LSB) then propagates downstream.  The comparison therefore
has two parts, both in float simulation (onnxruntime, optimizations off):

* **forced**: every activation QuantizeLinear of the fused graph is replaced
  by the integer codes the *unfused* graph produced, so both graphs see
  identical quantized activations (the unfused graph fed its own codes would
  compute what it computed running free, bit for bit, so its free-running run
  is the reference and is not repeated).  What remains is the fold itself: an error
  in a folded scale, sign or bias shows at the layer that has it (each layer's
  compensated output is compared), while float rounding cannot accumulate::

      unfused:  ... ─► Q ─► codes ─► DQ ─► layer ─► Mul(g) ─► Add(β) ─► ...
      fused:    ... ─►      codes ─► DQ ─► layer' ─► ...     (codes fed in)

* **free-running**: both graphs run on their own; the number of activation
  codes that differ (tie flips), and the resulting output difference.

Layers are matched by node name (the passes keep node names), and a layer's
tensor is its compensation point: the output, or a MatMul's bias-Add output,
followed through the explicit compensation ``Mul``/``Add`` when present.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from onnx import helper

from .calib_data import CalibrationSet
from .diffstats import DiffAccumulator, DiffStats
from .errors import QwtError
from .runtime import make_session, paired_runs, with_outputs

LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclasses.dataclass
class FoldCheck:
    forced_outputs: dict[str, DiffStats]  # fused vs unfused, same activation codes
    forced_layers: dict[str, DiffStats]  # layer -> its compensated output, same activation codes
    free_outputs: dict[str, DiffStats]  # each graph running free
    codes: int  # activation codes compared (free-running)
    flipped: int  # of which differ between the graphs
    max_code_diff: int  # in LSBs

    @property
    def worst_forced(self) -> float:
        return max([s.max_rel for s in (*self.forced_outputs.values(), *self.forced_layers.values())], default=0.0)

    def passes(self, rtol: float, output_atol: float) -> bool:
        """Every compensated layer within ``rtol`` of its max |reference|, every graph output within
        ``output_atol + rtol·max|reference|`` (see ``pipeline.FOLD_OUTPUT_ATOL``)."""
        return all(s.max_abs <= output_atol + rtol * s.max_ref for s in self.forced_outputs.values()) and \
            all(s.max_rel <= rtol for s in self.forced_layers.values())

    @property
    def forced_max_rel(self) -> dict[str, float]:
        """Graph output -> max relative difference, same activation codes."""
        return {k: s.max_rel for k, s in self.forced_outputs.items()}

    @property
    def forced_layer_max_rel(self) -> dict[str, float]:
        """Compensated layer -> max relative difference of its output, same activation codes."""
        return {k: s.max_rel for k, s in self.forced_layers.items()}

    def summary(self) -> dict:
        """The JSON-able numbers (max relative difference per tensor)."""
        return {"forced_max_rel": self.forced_max_rel, "forced_layer_max_rel": self.forced_layer_max_rel,
                "free_max_rel": {k: s.max_rel for k, s in self.free_outputs.items()},
                "codes": self.codes, "flipped": self.flipped, "max_code_diff": self.max_code_diff}


def activation_quantizers(model: onnx.ModelProto) -> dict[str, tuple[int, str]]:
    """Output name -> (elem type, float input name) of every QuantizeLinear of a non-constant tensor."""
    consts = {t.name for t in model.graph.initializer}
    types = {t.name: t.data_type for t in model.graph.initializer}
    out = {}
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear" and n.input[0] not in consts:
            zp = n.input[2] if len(n.input) > 2 else ""
            out[n.output[0]] = (types.get(zp, onnx.TensorProto.UINT8), n.input[0])
    return out


def layer_outputs(model: onnx.ModelProto) -> dict[str, str]:
    """Layer node name -> the tensor holding its (compensated) output, for layers with a constant or
    dequantized weight."""
    consts = {t.name for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    graph_outputs = {o.name for o in model.graph.output}

    def single(t: str, op: str) -> onnx.NodeProto | None:
        c = consumers.get(t, [])
        return c[0] if len(c) == 1 and c[0].op_type == op and t not in graph_outputs else None

    out = {}
    for node in model.graph.node:
        if node.op_type not in LAYER_OPS or len(node.input) < 2:
            continue
        w = node.input[1]
        if w not in consts and not (w in producer and producer[w].op_type == "DequantizeLinear"):
            continue
        t = node.output[0]
        add = single(t, "Add") if node.op_type == "MatMul" else None
        if add is not None and any(i in consts or (i in producer and producer[i].op_type == "DequantizeLinear")
                                   for i in add.input if i != t):
            t = add.output[0]
        mul = single(t, "Mul")
        if mul is not None and mul.name == f"{node.name}_cwac_Mul" and (cadd := single(mul.output[0], "Add")):
            t = cadd.output[0]
        out[node.name] = t
    return out


def code_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a − b| of two integer code tensors, flattened, in a type that holds it (int16 for 8-bit codes)."""
    wide = np.int16 if a.dtype.itemsize == 1 and b.dtype.itemsize == 1 else np.int64
    return np.abs(np.subtract(a.ravel(), b.ravel(), dtype=wide))


def _forced(model: onnx.ModelProto, codes: dict[str, tuple[int, str]], extra: dict[str, int]) -> onnx.ModelProto:
    """``model`` with each activation quantizer removed and its output made a graph input."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    keep = [n for n in m.graph.node if not (n.op_type == "QuantizeLinear" and n.output[0] in codes)]
    del m.graph.node[:]
    m.graph.node.extend(keep)
    m.graph.input.extend(helper.make_tensor_value_info(n, t, None) for n, (t, _) in codes.items())
    return with_outputs(m, extra)


class FoldAccumulator:
    """The fold check's statistics, sample by sample: fed the free-running outputs and activation codes
    of both graphs (``fetch``), it runs the forced pair itself on the unfused graph's codes."""

    def __init__(self, fused: onnx.ModelProto, unfused: onnx.ModelProto):
        codes = activation_quantizers(unfused)
        if set(activation_quantizers(fused)) != set(codes):
            only_f = sorted(set(activation_quantizers(fused)) - set(codes))[:5]
            only_u = sorted(set(codes) - set(activation_quantizers(fused)))[:5]
            raise QwtError("the two models are not a fused/unfused pair: their activation quantizers differ",
                           notes=[f"only in the fused model: {only_f}", f"only in the unfused model: {only_u}"],
                           fix="pass the model compile wrote and the one --emit-unfused wrote in the same run; "
                               "use 'qwt2-onnx diff' to compare unrelated models")
        self.codes = codes
        self.outputs = [o.name for o in unfused.graph.output]
        f_layers, u_layers = layer_outputs(fused), layer_outputs(unfused)
        layers = [k for k in u_layers if k in f_layers]
        self.f_layers, self.u_layers = {k: f_layers[k] for k in layers}, {k: u_layers[k] for k in layers}
        self.fetch = {c: t for c, (t, _) in codes.items()}  # what each free-running graph must return
        self.free_names = self.outputs + [c for c in codes if c not in self.outputs]  # ... and update reads
        # the unfused graph fed its own codes computes what it computed running free, bit for bit: its
        # free-running run is the forced pair's reference, so it also returns its layers' outputs
        ul = {t: onnx.TensorProto.FLOAT for t in self.u_layers.values()}
        self.u_fetch = {**self.fetch, **ul}
        self.u_names = self.free_names + [t for t in ul if t not in self.free_names]
        fl = {t: onnx.TensorProto.FLOAT for t in self.f_layers.values()}
        self.forced_f = make_session(_forced(fused, codes, fl), optimized=False, arena=False)
        self.ff_names = self.outputs + list(fl)
        self.acc = {kind: {o: DiffAccumulator(o) for o in self.outputs} for kind in ("forced", "free")}
        self.acc_layers = {k: DiffAccumulator(k) for k in layers}
        self.total = self.flipped = self.worst = 0

    def update(self, feed: dict[str, np.ndarray], u: dict[str, np.ndarray], f: dict[str, np.ndarray]) -> None:
        """``u``, ``f``: the unfused and fused graphs' free-running outputs and codes on ``feed`` (``u``: also
        the unfused layers' outputs, ``u_names``)."""
        for c in self.codes:
            d = code_distance(u[c], f[c])
            self.total, self.flipped = self.total + d.size, self.flipped + int(np.count_nonzero(d))
            self.worst = max(self.worst, int(d.max()) if d.size else 0)
        for o in self.outputs:
            self.acc["free"][o].update(u[o], f[o])
        feed_codes = {**feed, **{c: u[c] for c in self.codes}}
        ff = dict(zip(self.ff_names, self.forced_f.run(self.ff_names, feed_codes)))
        for o in self.outputs:
            self.acc["forced"][o].update(u[o], ff[o])
        for k, a in self.acc_layers.items():
            a.update(u[self.u_layers[k]], ff[self.f_layers[k]])

    def result(self) -> FoldCheck:
        return FoldCheck({o: a.result() for o, a in self.acc["forced"].items()},
                         {k: a.result() for k, a in self.acc_layers.items()},
                         {o: a.result() for o, a in self.acc["free"].items()}, self.total, self.flipped, self.worst)


def check_fold(fused: onnx.ModelProto, unfused: onnx.ModelProto, data: CalibrationSet, batch_size: int) -> FoldCheck:
    """The fold check alone (``qwt2-onnx check``; a compile runs it inside :mod:`verify`'s one pass)."""
    acc = FoldAccumulator(fused, unfused)
    run_u = make_session(with_outputs(unfused, acc.u_fetch), optimized=False)
    run_f = make_session(with_outputs(fused, acc.fetch), optimized=False)
    # sized by the free-running pair, whose fetches (every activation code) are the larger ones
    for feed, (u, f) in paired_runs(data, batch_size, [(run_u, acc.u_names), (run_f, acc.free_names)]):
        acc.update(feed, u, f)
    return acc.result()
