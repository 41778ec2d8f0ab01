"""The equivalence checker and numerical diff (DESIGN.md §5): records, not text.

Three comparisons, each per graph output and per layer (layers matched by
node name, through :func:`equivalence.layer_outputs`):

1. fused vs unfused in float simulation: the gating one.  Same activation
   codes fed to both (see :mod:`equivalence`), so what differs is the fold;
   free-running numbers (tie flips) are reported beside it.
2. fused vs unfused as deployed: the fused graph with onnxruntime's
   optimizations on (integer kernels) vs the unfused one simulated; output
   differences in LSBs of the output's quantization scale where it has one,
   and a histogram of activation-code differences in LSBs, with the codes at
   a rounding tie counted.
3. float vs plain PTQ vs CWAC: per-layer SQNR/cosine of both (``compile``).

``diff`` compares any two models with the same interface (outputs, named
output parts, and layers present in both).  Renderers (terminal, JSON, HTML)
live in :mod:`report` and only read these records.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import re

import numpy as np
import onnx

from .calib_data import CalibrationSet
from .cwac.records import GateRecord, LayerRow
from .diffstats import DiffAccumulator, DiffStats, Tolerance, Verdict
from .equivalence import (
    FoldCheck,
    activation_quantizers,
    check_fold,
    code_distance,
    layer_outputs,
)
from .errors import QwtError
from .runtime import make_session, paired_runs, with_outputs

SCHEMA = "qwt2-onnx/check-report/1"


@dataclasses.dataclass(frozen=True)
class OutputPart:
    """A named slice of one output along one axis (``boxes=output0:axis=1:0:4``)."""

    name: str
    output: str
    axis: int
    start: int
    stop: int

    @classmethod
    def parse(cls, text: str) -> "OutputPart":
        m = re.fullmatch(r"([^=]+)=([^:]+):axis=(-?\d+):(\d+):(\d+)", text)
        if not m:
            raise QwtError(f"cannot parse output part {text!r}",
                           fix="write it as NAME=OUTPUT:axis=AXIS:START:STOP, e.g. boxes=output0:axis=1:0:4")
        if int(m[4]) >= int(m[5]):
            raise QwtError(f"output part {text!r} is empty: START {m[4]} is not below STOP {m[5]}",
                           fix="write NAME=OUTPUT:axis=AXIS:START:STOP with START < STOP")
        return cls(m[1], m[2], int(m[3]), int(m[4]), int(m[5]))

    def take(self, x: np.ndarray) -> np.ndarray:
        if not -x.ndim <= self.axis < x.ndim or self.stop > x.shape[self.axis]:
            raise QwtError(f"output part '{self.name}' does not fit output '{self.output}' of shape {list(x.shape)}",
                           notes=[f"axis {self.axis}, range {self.start}:{self.stop}"],
                           fix=f"pick an axis in [-{x.ndim}, {x.ndim - 1}] and STOP <= that axis's size")
        sl = [slice(None)] * x.ndim
        sl[self.axis % x.ndim] = slice(self.start, self.stop)
        return x[tuple(sl)]


@dataclasses.dataclass
class Comparison:
    title: str
    reference: str
    candidate: str
    outputs: dict[str, DiffStats]
    layers: dict[str, DiffStats]
    verdicts: list[Verdict]  # empty when the comparison is informational
    notes: list[str] = dataclasses.field(default_factory=list)
    code_lsb_histogram: dict[int, int] | None = None  # |code difference| in LSBs -> count
    tie_flips: int | None = None  # code differences where the reference value sat at a rounding tie
    role: str = "diff"  # "fold" | "free" | "deployed" | "plain_vs_float" | "cwac_vs_float" | "diff"

    @property
    def passed(self) -> bool:
        return all(v.passed for v in self.verdicts)


@dataclasses.dataclass
class CheckReport:
    kind: str  # "check" | "diff" | "compile"
    models: dict[str, str]  # role -> path or description
    data: DataSummary
    comparisons: list[Comparison]
    created: str  # the only time-dependent field
    cwac_layers: list[LayerRow] = dataclasses.field(default_factory=list)  # compile only: per layer
    cwac_gate: GateRecord | None = None  # compile only: the model-level choice (``CwacFit.gate_record``)
    schema: str = SCHEMA

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.comparisons)

    @property
    def verdicts(self) -> list[Verdict]:
        return [v for c in self.comparisons for v in c.verdicts]


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@dataclasses.dataclass(frozen=True)
class DataSummary:
    """What a report ran on: the source, the sample count, a SHA-256 over every input array in order and
    the seed of generated data."""

    source: str
    samples: int
    sha256: str
    seed: int | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def data_summary(data: CalibrationSet, batch_size: int, seed: int | None = None) -> DataSummary:
    """Source, sample count and a SHA-256 over every input array in order, so a report names its data."""
    h, n = hashlib.sha256(), 0
    for feed in data:  # sample by sample: the hash names the data, whatever the batch size
        for name in sorted(feed):
            h.update(name.encode())
            h.update(np.ascontiguousarray(feed[name]).tobytes())
        n += 1
    return DataSummary(data.description, n, h.hexdigest(), seed)


def _lsb_scales(model: onnx.ModelProto) -> dict[str, float]:
    """Tensor -> per-tensor quantization scale, for tensors a QuantizeLinear reads or a DQ produces."""
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    out = {}
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.input[1] in inits and inits[n.input[1]].size == 1:
            out[n.input[0] if n.op_type == "QuantizeLinear" else n.output[0]] = float(inits[n.input[1]].item())
    return out


def fold_comparisons(fold: FoldCheck, tol: Tolerance, names: tuple[str, str],
                     output_tol: Tolerance | None = None) -> list[Comparison]:
    """``tol`` judges the compensated layers, ``output_tol`` (default ``tol``) the graph outputs."""
    output_tol = output_tol or tol
    forced = Comparison("fused vs unfused, float simulation, same activation codes", names[0], names[1],
                        fold.forced_outputs, fold.forced_layers,
                        [Verdict.judge(s, output_tol, "output") for s in fold.forced_outputs.values()]
                        + [Verdict.judge(s, tol, "layer") for s in fold.forced_layers.values()],
                        ["every activation QuantizeLinear is replaced by the unfused graph's codes, so only the "
                         "fold can differ"], role="fold")
    free = Comparison("fused vs unfused, float simulation, free-running", names[0], names[1], fold.free_outputs, {},
                      [], [f"{fold.flipped} of {fold.codes} activation codes differ (max {fold.max_code_diff} LSB): "
                           "float rounding moves values that sit at a .5 rounding tie, and a flipped code "
                           "propagates; informational"], role="free")
    return [forced, free]


class DeployedAccumulator:
    """Comparison 2's statistics: the fused graph deployed (``dep_fetch``: outputs and activation codes)
    vs the unfused one simulated (``sim_fetch``: also each code's float input, to count rounding ties)."""

    def __init__(self, fused: onnx.ModelProto, unfused: onnx.ModelProto):
        self.codes = activation_quantizers(unfused)
        self.outputs = [o.name for o in unfused.graph.output]
        self.dep_fetch = {c: t for c, (t, _) in self.codes.items()}
        self.sim_fetch = {**self.dep_fetch, **{src: onnx.TensorProto.FLOAT for _, src in self.codes.values()}}
        self.scales = _lsb_scales(unfused)
        self.q_scales = {c: self.scales.get(src) for c, (_, src) in self.codes.items()}
        self.acc = {o: DiffAccumulator(o) for o in self.outputs}
        self.hist: dict[int, int] = {}
        self.ties = 0

    def update(self, d: dict[str, np.ndarray], s: dict[str, np.ndarray]) -> None:
        for o in self.outputs:
            self.acc[o].update(s[o], d[o])
        for c, (_, src) in self.codes.items():
            diff = code_distance(d[c], s[c])
            moved = np.flatnonzero(diff)  # few: count the equal codes, bin only the moved ones
            if diff.size > moved.size:
                self.hist[0] = self.hist.get(0, 0) + diff.size - moved.size
            for v, k in enumerate(np.bincount(diff[moved])):
                if k:
                    self.hist[v] = self.hist.get(v, 0) + int(k)
            if self.q_scales[c] and moved.size:
                y = s[src].ravel()[moved].astype(np.float64) / self.q_scales[c]
                # y − floor(y) is np.mod(y, 1.0) bit for bit (both round the same exact difference), faster
                frac = np.abs(y - np.floor(y) - 0.5)
                self.ties += int(np.count_nonzero(frac < 1e-3))

    def result(self, names: tuple[str, str]) -> Comparison:
        outs = {o: a.result(self.scales.get(o)) for o, a in self.acc.items()}
        return Comparison("fused (deployed: onnxruntime integer kernels) vs unfused (float simulation)", names[0],
                          names[1], outs, {}, [],
                          ["informational: integer kernels requantize with their own rounding; differences are in "
                           "LSBs of each activation quantizer"], dict(sorted(self.hist.items())), self.ties,
                          role="deployed")


def deployed_comparison(fused: onnx.ModelProto, unfused: onnx.ModelProto, data: CalibrationSet,
                        batch_size: int, names: tuple[str, str]) -> Comparison:
    """Fused with integer kernels (optimizations on) vs unfused simulated: outputs and activation codes in LSBs."""
    acc = DeployedAccumulator(fused, unfused)
    dep = make_session(with_outputs(fused, acc.dep_fetch), optimized=True)
    sim = make_session(with_outputs(unfused, acc.sim_fetch), optimized=False)
    want_dep, want_sim = acc.outputs + list(acc.dep_fetch), acc.outputs + list(acc.sim_fetch)
    for _, (d, s) in paired_runs(data, batch_size, [(dep, want_dep), (sim, want_sim)]):
        acc.update(d, s)
    return acc.result(names)


class LayerAccumulator:
    """Comparison 3's (and ``diff``'s) statistics: graph outputs, named output parts and every layer present
    in both models, by node name; ``ref_fetch`` / ``cand_fetch`` are the layer tensors each must return."""

    def __init__(self, ref: onnx.ModelProto, cand: onnx.ModelProto, names: tuple[str, str],
                 parts: tuple[OutputPart, ...] = ()):
        r_layers, c_layers = layer_outputs(ref), layer_outputs(cand)
        layers = [k for k in c_layers if k in r_layers]
        self.outputs = [o.name for o in ref.graph.output]
        if [o.name for o in cand.graph.output] != self.outputs:
            raise QwtError("the two models have different outputs",
                           notes=[f"{names[0]}: {self.outputs}", f"{names[1]}: {[o.name for o in cand.graph.output]}"],
                           fix="compare models with the same interface")
        for p in parts:
            if p.output not in self.outputs:
                raise QwtError(f"output part '{p.name}' names an unknown output '{p.output}'",
                               notes=[f"outputs: {', '.join(self.outputs)}"], fix="use one of the model's output names")
        self.parts = parts
        self.r_layers, self.c_layers = {k: r_layers[k] for k in layers}, {k: c_layers[k] for k in layers}
        self.ref_fetch = {t: onnx.TensorProto.FLOAT for t in self.r_layers.values()}
        self.cand_fetch = {t: onnx.TensorProto.FLOAT for t in self.c_layers.values()}
        self.acc = {o: DiffAccumulator(o) for o in self.outputs} | {p.name: DiffAccumulator(p.name) for p in parts}
        self.lacc = {k: DiffAccumulator(k) for k in layers}

    def update(self, r: dict[str, np.ndarray], c: dict[str, np.ndarray]) -> None:
        for o in self.outputs:
            self.acc[o].update(r[o], c[o])
        for p in self.parts:
            self.acc[p.name].update(p.take(r[p.output]), p.take(c[p.output]))
        for k, a in self.lacc.items():
            a.update(r[self.r_layers[k]], c[self.c_layers[k]])

    def result(self, title: str, names: tuple[str, str], tolerances: dict[str, Tolerance] | None = None,
               role: str = "diff") -> Comparison:
        outs = {k: a.result() for k, a in self.acc.items()}
        verdicts = []
        if tolerances is not None:
            default = tolerances.get("*", Tolerance())
            verdicts = [Verdict.judge(s, tolerances.get(k, default)) for k, s in outs.items()]
        return Comparison(title, names[0], names[1], outs, {k: a.result() for k, a in self.lacc.items()}, verdicts,
                          role=role)


def layer_comparison(title: str, ref: onnx.ModelProto, cand: onnx.ModelProto, data: CalibrationSet,
                     batch_size: int, names: tuple[str, str], ref_optimized: bool = True,
                     cand_optimized: bool = False, parts: tuple[OutputPart, ...] = (),
                     tolerances: dict[str, Tolerance] | None = None, role: str = "diff") -> Comparison:
    """Outputs (and named parts) and every layer present in both models, by node name."""
    acc = LayerAccumulator(ref, cand, names, parts)
    rs = make_session(with_outputs(ref, acc.ref_fetch), optimized=ref_optimized)
    cs = make_session(with_outputs(cand, acc.cand_fetch), optimized=cand_optimized)
    rn, cn = acc.outputs + list(acc.ref_fetch), acc.outputs + list(acc.cand_fetch)
    for _, (r, c) in paired_runs(data, batch_size, [(rs, rn), (cs, cn)]):
        acc.update(r, c)
    return acc.result(title, names, tolerances, role)


def check(fused: onnx.ModelProto, unfused: onnx.ModelProto, data: CalibrationSet, tol: Tolerance = Tolerance(),
          batch_size: int = 8, names: tuple[str, str] = ("unfused", "fused")) -> list[Comparison]:
    """Comparisons 1 and 2 of fused vs unfused."""
    return [*fold_comparisons(check_fold(fused, unfused, data, batch_size), tol, names),
            deployed_comparison(fused, unfused, data, batch_size, names)]


def diff(ref: onnx.ModelProto, cand: onnx.ModelProto, data: CalibrationSet, tolerances: dict[str, Tolerance],
         parts: tuple[OutputPart, ...] = (), batch_size: int = 8, names: tuple[str, str] = ("reference", "candidate"),
         deployed: bool = True) -> Comparison:
    """Reference (optimized) vs candidate (deployed, or simulated when ``deployed=False``)."""
    mode = "deployed" if deployed else "float simulation"
    return layer_comparison(f"{names[1]} ({mode}) vs {names[0]}", ref, cand, data, batch_size, names,
                            ref_optimized=True, cand_optimized=deployed, parts=parts, tolerances=tolerances)
