"""The staged CWAC fit (DESIGN.md §2): exact protocol, one pass over the model.

Stages: a layer's stage is 1 + the largest stage of the quantized layers
upstream of it, so layers in one stage have no path between them (q/k/v
projections share a stage).  Stage s is fitted on the quantized model with
every compensation of stages < s applied, so no upstream error is compensated
twice.  Each stage runs only its graph segment, fed from the tensors cached
by earlier stages (:mod:`qwt2_onnx.segments`): the result is that of
re-running the whole prefix per stage, at the cost of about one pass.

Targets (f in the least-squares fit of :mod:`qwt2_onnx.cwac`):

* ``global``: f = the float model's tensor at the compensation point, same sample;
* ``local``:  f = the float layer (float weight and bias) applied to the
  quantized model's own dequantized input at that layer: it corrects only the
  layer's own weight (and bias) quantization error;
* ``auto`` (default): fit both and keep the one with the lower output error.

Score heads (layers whose output is the logits of a Sigmoid at a
graph output) are fitted to keep the float logits' spread rather than by
least squares (``CwacConfig.head_fit``; why in :mod:`qwt2_onnx.cwac`).

Gates, so that compensation never makes things worse silently.  The samples
are split into a fit part and a held-out part (the last ``holdout_fraction``):

1. per layer: a fitted map that does not lower the layer's own error on the
   held-out part is dropped (``LayerFit.status`` says so);
2. per model: each candidate (``global``, ``local``, none) is scored by the
   graph outputs' error vs float on the held-out part (sum over outputs of
   mean squared error / mean square of the float output); the lowest wins,
   and "none" wins if no compensation pays.  The ranking is by the sum over
   held-out samples; how many samples a candidate made worse, and what
   their rises add up to, is reported beside it (``CwacFit.held_out_samples``).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .calib_data import CalibrationSet, InputSpec
from .config import CwacConfig
from .cwac import ChannelSums, Compensation, fit_affine, real_positions, sigmoid_sq_error
from .cwac_gate import SHAPE_ONLY, OutputError, output_errors, sigmoid_logits
from .errors import QwtError
from .graph_io import export_model
from .passes.fold_compensation import weight_shape
from .passes.insert_compensation import InsertCompensationPass, compensation_point
from .policy import QuantPlan
from .runtime import batches, make_session, per_sample, with_outputs
from .segments import SegmentPlan, TensorCache, node_inputs

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class LayerFit:
    layer: str
    stage: int
    status: str  # "compensated" | "rejected: <reason>"
    mse_before: float  # the layer's own error on the held-out samples, vs its target
    mse_after: float
    stats: dict


@dataclasses.dataclass
class CwacFit:
    """What the fit chose: ``compensations`` (empty when none pays) and why."""

    compensations: dict[str, Compensation]
    target: str  # the chosen candidate: "global", "local" or "none"
    layers: list[LayerFit]  # of the chosen candidate
    output_error: dict[str, float]  # candidate -> held-out output error (lower is better)
    stages: int
    seconds: float
    full_range_left_alone: int = 0  # channels left uncompensated: negative gain on an unflippable row
    per_sample: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # candidate -> each held-out
    # sample's share of its output error (absent where an output has no per-sample axis)
    decisions: dict[str, float] = dataclasses.field(default_factory=dict)  # candidate -> share of held-out
    # Softmax positions whose argmax is float's (absent without a Softmax output)
    vetoed: list[str] = dataclasses.field(default_factory=list)  # candidates the decision veto removed
    rejected_by_gate: bool = False  # --cwac-params: the output gate would not have kept them (folded as asked)

    def held_out_samples(self) -> dict | None:
        """How each candidate did sample by sample against no compensation: the held-out samples whose
        output error it raised, and what those rises add up to as a fraction of no compensation's whole
        held-out error (a ratio per sample would make much of a sample plain PTQ got almost exactly right).
        The gate ranks by the sum; this says what the sum hides."""
        base = self.per_sample.get("none")
        if base is None:
            return None
        worse, added = {}, {}
        for target, errs in self.per_sample.items():
            if target == "none":
                continue
            rise = errs - base
            worse[target] = int(np.sum(rise > 0))
            added[target] = round(float(rise[rise > 0].sum() / base.sum()), 4) if base.sum() > 0 else None
        return {"n": int(base.size), "worse_than_none": worse, "added_error": added}

    @property
    def real_positions_layers(self) -> int:
        """Layers whose statistics counted real positions only (``--cwac-position-mask``)."""
        return sum(bool(f.stats.get("real_positions_only")) for f in self.layers)

    def gate_record(self) -> dict:
        """The output gate's choice for the report: the target kept, each candidate's held-out output error
        and the per-sample account (:meth:`held_out_samples`)."""
        return {"target": self.target, "output_error": {k: round(v, 8) for k, v in self.output_error.items()},
                "held_out_samples": self.held_out_samples(),
                "decision_agreement": {k: round(v, 6) for k, v in self.decisions.items()} or None,
                "vetoed": list(self.vetoed)}

    def summary(self, n_layers: int) -> dict:
        return {**self.gate_record(), "compensated": len(self.compensations), "layers": n_layers,
                "stages": self.stages,
                "score_heads_keep_spread": sum(f.stats.get("fit") == "keep spread" for f in self.layers),
                "real_positions_only": self.real_positions_layers,
                "full_range_negative_gain_left_alone": self.full_range_left_alone, "fit_s": round(self.seconds, 2)}


def layer_report(fit: CwacFit, strategies: dict[str, str]) -> list[dict]:
    """One record per layer of the chosen fit: stage, status, fold strategy, gain range, held-out error."""
    rows = []
    for f in fit.layers:
        comp = fit.compensations.get(f.layer)
        rows.append({"layer": f.layer, "stage": f.stage,
                     "status": f.status if fit.target != "none" else "not compensated: no held-out output gain",
                     "fold": strategies.get(f.layer, "–"),
                     "gain_min": float(comp.gain.min()) if comp is not None else None,
                     "gain_max": float(comp.gain.max()) if comp is not None else None,
                     "negative_gains": int((comp.gain < 0).sum()) if comp is not None else 0,
                     "heldout_mse_before": f.mse_before, "heldout_mse_after": f.mse_after,
                     "fit": f.stats.get("fit"),
                     "positions": "real" if f.stats.get("real_positions_only") else "all",
                     "zero_variance_channels": f.stats.get("zero_variance", 0),
                     "rejected_channels": f.stats.get("rejected_channels", 0)})
    return rows


def layer_stages(model: onnx.ModelProto, layers: list[str]) -> dict[str, int]:
    """Stage of each layer: 1 + max stage of quantized layers upstream, through subgraphs' outer-scope
    reads too (a layer behind an If whose branch reads another layer's output comes after it).  The
    model's nodes must be in topological order, as the passes leave them."""
    wanted = set(layers)
    depth: dict[str, int] = {}  # tensor name -> max stage upstream
    stages = {}
    for node in model.graph.node:
        d = max((depth.get(t, 0) for t in node_inputs(node)), default=0)
        if node.name in wanted:
            d += 1
            stages[node.name] = d
        for t in node.output:
            depth[t] = d
    return stages


def float_point(qnode: gs.Node, fnodes: dict[str, gs.Node]) -> str:
    """The float model's tensor at the quantized layer's compensation point, found through node names
    (tensor names may differ in a model quantized by another tool): the output of the float node that
    produces the point — the layer itself or its bias Add — or, when that node was inserted by us (the
    zero-bias Add of a MatMul whose following Add is not its bias, e.g. a 3-D MatMul), the layer's output.
    Matching the layer's own compensation point in the float graph instead would take such a following
    Add for the bias and fit against a target shifted by it.  ``fnodes``: the float graph's nodes by name."""
    point = compensation_point(qnode)
    producer = point.inputs[0].name if point.inputs else qnode.name
    if producer in fnodes:
        return fnodes[producer].outputs[0].name
    return fnodes[qnode.name].outputs[0].name if qnode.name in fnodes else point.name


_DATA_MOVEMENT = SHAPE_ONLY + ("Concat", "Split", "Slice")


def score_head_layers(float_model: onnx.ModelProto, fpoints: dict[str, str], feed: dict[str, np.ndarray]) -> set[str]:
    """The layers whose output is a score head's logits, fitted with ``keep_spread`` (see
    :mod:`qwt2_onnx.cwac`): their float point reaches the input of a Sigmoid at a graph output through
    data movement only (reshapes, Concat, Split, Slice).  A Split or Slice may send another layer's
    values elsewhere (YOLO's heads concatenate box and class channels, then split them again), so where the
    walk passed one, each candidate is confirmed on ``feed``: every value of its tensor must reappear,
    copied, in the logits.  ``fpoints``: layer -> its float compensation point."""
    producer = {o: n for n in float_model.graph.node for o in n.output}
    layers_at: dict[str, list[str]] = {}
    for layer, t in fpoints.items():
        layers_at.setdefault(t, []).append(layer)
    heads: set[str] = set()
    for logits in sigmoid_logits(float_model):
        found, stack, seen, selective = set(), [logits], set(), False
        while stack:
            t = stack.pop()
            if t in seen:
                continue
            seen.add(t)
            node = producer.get(t)
            if t in layers_at:
                found.add(t)
            elif node is not None and node.op_type in _DATA_MOVEMENT:
                selective |= node.op_type in ("Split", "Slice")
                stack += list(node.input) if node.op_type == "Concat" else [node.input[0]]
        if found and selective:
            names = [logits, *sorted(found)]
            values = dict(zip(names, make_session(with_outputs(float_model, names), optimized=False).run(names, feed)))
            found = {t for t in found if np.isin(values[t], values[logits]).all()}
        heads |= {layer for t in found for layer in layers_at[t]}
    return heads


def _axis(op: str) -> int:
    return 1 if op in ("Conv", "ConvTranspose") else -1


def _identity(plan: QuantPlan, graph: gs.Graph) -> dict[str, Compensation]:
    """g = 1, β = 0 for every layer: the unfused graph's structure, before any fit."""
    nodes = {n.name: n for n in graph.nodes}
    comps = {}
    for lp in plan.layers:
        c = weight_shape(nodes[lp.node])[lp.axis]
        comps[lp.node] = Compensation(lp.node, np.ones(c, np.float32), np.zeros(c, np.float32), _axis(lp.op), "none", {})
    return comps


def _add_local_twins(graph: gs.Graph, plan: QuantPlan, float_consts: dict[str, np.ndarray]) -> dict[str, str]:
    """For each layer a float copy reading the same (dequantized) input; -> layer: twin output name."""
    nodes = {n.name: n for n in graph.nodes}
    twins = {}
    for lp in plan.layers:
        node = nodes[lp.node]
        inputs = [node.inputs[0], gs.Constant(f"{lp.weight}_cwac_local_w", float_consts[lp.weight])]
        if lp.bias and lp.bias_node == lp.node:
            inputs.append(gs.Constant(f"{lp.bias}_cwac_local_b", float_consts[lp.bias]))
        y = gs.Variable(f"{lp.node}_cwac_local_y", dtype=np.float32)
        graph.nodes.append(gs.Node(node.op, f"{lp.node}_cwac_local", dict(node.attrs), inputs, [y]))
        if lp.bias and lp.bias_node != lp.node:  # MatMul -> Add(b)
            b = gs.Constant(f"{lp.bias}_cwac_local_b", float_consts[lp.bias])
            out = gs.Variable(f"{lp.node}_cwac_local_yb", dtype=np.float32)
            graph.nodes.append(gs.Node("Add", f"{lp.node}_cwac_local_add",
                                       inputs=[y, b] if lp.bias_input == 1 else [b, y], outputs=[out]))
            y = out
        twins[lp.node] = y.name
    return twins


class _StagedFit:
    """One candidate target's staged fit over cached segment boundaries."""

    def __init__(self, float_model: onnx.ModelProto, qmodel: onnx.ModelProto, plan: QuantPlan, cfg: CwacConfig,
                 parts: "_Parts", target: str):
        self.plan, self.cfg, self.parts, self.target = plan, cfg, parts, target
        qgraph = gs.import_onnx(qmodel)
        nodes = {n.name: n for n in qgraph.nodes}
        self.layers = [lp.node for lp in plan.layers]
        self.stages = layer_stages(qmodel, self.layers)
        self.points = {name: compensation_point(nodes[name]).name for name in self.layers}
        fgraph = gs.import_onnx(float_model)
        fnodes = {n.name: n for n in fgraph.nodes}
        self.fpoints = {name: float_point(nodes[name], fnodes) for name in self.layers}
        self.axes = {lp.node: _axis(lp.op) for lp in plan.layers}
        self.masks: dict[int, np.ndarray] = {}  # batch -> cfg.position_mask's value
        self.batch_samples: dict[int, int] = {}  # batch -> how many samples it holds
        self.masked: set[str] = set()  # layers whose statistics counted real positions only
        self.heads = (score_head_layers(float_model, self.fpoints, next(batches(parts.fit, parts.batch_size))[0])
                      if cfg.head_fit == "spread" else set())
        InsertCompensationPass(_identity(plan, qgraph))(qgraph)
        self.twins = {}
        if target == "local":
            consts = {t.name: onnx.numpy_helper.to_array(t) for t in float_model.graph.initializer}
            self.twins = _add_local_twins(qgraph, plan, consts)
        qgraph.toposort()
        self.umodel = export_model(qgraph)
        # the raw (pre-compensation) point: the compensation Mul's input, renamed if it was a graph output
        muls = {n.name: n for n in self.umodel.graph.node}
        self.raw = {name: muls[f"{name}_cwac_Mul"].input[0] for name in self.layers}
        self.inits = {t.name: t for t in self.umodel.graph.initializer}
        self.fmodel = export_model(fgraph.toposort())

    def run(self) -> tuple[dict[str, Compensation], list[LayerFit]]:
        n_stages = max(self.stages.values(), default=0)
        members = [[n for n in self.layers if self.stages[n] == s] for s in range(1, n_stages + 1)]
        q_plan = SegmentPlan(self.umodel, [[self.raw[n] for n in m] + [self.twins[n] for n in m if n in self.twins]
                                           for m in members])
        f_plan = SegmentPlan(self.fmodel, [[self.fpoints[n] for n in m] for m in members]) \
            if self.target == "global" else None
        comps, fits = {}, []
        budget = self.cfg.cache_mib * 2**20
        with TensorCache(budget) as qcache, TensorCache(budget) as fcache:
            n_batches = self._seed_caches(qcache, fcache)
            for k, names in enumerate(members):
                maps, hold, head_err = self._stage_fit(k, names, q_plan, f_plan, qcache, fcache, n_batches)
                for name in names:
                    fit = self._judge(name, k + 1, maps[name], hold[name], head_err.get(name))
                    fits.append(fit)
                    if fit.status == "compensated":
                        comps[name] = fit.stats.pop("compensation")
                        self._set_initializers(comps[name])
                for plan_, cache in ((q_plan, qcache), (f_plan, fcache)):
                    if plan_ is not None:
                        for t in [t for t, last in plan_.last_use.items() if last == k]:
                            cache.drop(t, n_batches)
        return comps, fits

    def _seed_caches(self, qcache: TensorCache, fcache: TensorCache) -> int:
        b = 0
        for part in (self.parts.fit, self.parts.hold):
            for feed, n in batches(part, self.parts.batch_size):
                self.batch_samples[b] = n
                if self.cfg.position_mask:
                    self.masks[b] = feed[self.cfg.position_mask]
                for name, value in feed.items():
                    qcache.put(b, name, value)
                    fcache.put(b, name, value)
                b += 1
            if part is self.parts.fit:
                self.n_fit = b
        return b

    def _stage_fit(self, k, names, q_plan, f_plan, qcache, fcache, n_batches):
        """Each layer's map (``fit_affine``'s result), fitted on the fit part's channel sums as soon as the
        fit batches (which come first) are summed; its channel sums over the held-out part; and for score
        heads their held-out score error without / with the map."""
        qseg = q_plan.segments[k]
        qsess = make_session(q_plan.extract(self.umodel, k, qcache.dtypes), optimized=False)
        fsess = fseg = None
        if f_plan is not None:
            fseg = f_plan.segments[k]
            # unoptimized, like the quantized side: onnxruntime's fusions differ between a segment and the
            # whole model, and their ulp-level differences in the target would change the staged result
            fsess = make_session(f_plan.extract(self.fmodel, k, fcache.dtypes), optimized=False)
        n_fit = self.n_fit
        sums: dict[tuple[str, str], ChannelSums] = {}
        maps: dict[str, tuple] = {}
        head_err = {name: [0.0, 0.0] for name in names if name in self.heads}
        for b in range(n_batches):
            if b == n_fit:
                maps = {name: fit_affine(sums[("fit", name)], self.cfg.lam, self.cfg.max_gain,
                                         keep_spread=name in self.heads) for name in names}
            qout = dict(zip(qseg.outputs, qsess.run(list(qseg.outputs), {t: qcache.get(b, t) for t in qseg.inputs})))
            _cache_extra(q_plan, k, qout, qcache, b)
            if fsess is not None:
                fout = dict(zip(fseg.outputs, fsess.run(list(fseg.outputs), {t: fcache.get(b, t) for t in fseg.inputs})))
                _cache_extra(f_plan, k, fout, fcache, b)
                for name in names:
                    if self.fpoints[name] in f_plan.last_use:
                        fcache.put(b, self.fpoints[name], fout[self.fpoints[name]])
            n, mask = self.batch_samples[b], self.masks.get(b)
            for name in names:
                q = qout[self.raw[name]]
                f = qout[self.twins[name]] if self.target == "local" else fout[self.fpoints[name]]
                key = ("fit" if b < n_fit else "hold", name)
                # sample by sample, in order: the same sums whatever the batch size (runtime.per_sample)
                qs, fs, ms = per_sample(q, n), per_sample(f, n), [mask]
                if len(qs) == len(fs) == n:
                    ms = per_sample(mask, n) if mask is not None else [None] * n
                else:
                    qs, fs = [q], [f]
                for qi, fi, mi in zip(qs, fs, ms):
                    axis, (qr, fr) = real_positions(mi, self.axes[name], qi, fi)
                    if qr is not qi:
                        self.masked.add(name)
                    if key not in sums:
                        sums[key] = ChannelSums(qr.shape[axis], axis)
                    sums[key].update(qr, fr)
                    if name in head_err and b >= n_fit:
                        head_err[name][0] += sigmoid_sq_error(qr, fr, axis)
                        head_err[name][1] += sigmoid_sq_error(qr, fr, axis, *maps[name][:2])
                if self.raw[name] in q_plan.last_use:
                    qcache.put(b, self.raw[name], q)
        return maps, {name: sums[("hold", name)] for name in names}, head_err

    def _judge(self, name: str, stage: int, fitted: tuple, hold_sums: ChannelSums,
               head_err: list[float] | None = None) -> LayerFit:
        """Keep the layer's fitted map if it lowers the layer's held-out error: its output's MSE, or for a
        score head (``head_err``: held-out score error without / with the map) its scores' error."""
        g, beta, stats = fitted
        if name in self.masked:
            stats["real_positions_only"] = True
        if head_err is not None:
            n = hold_sums.n * hold_sums.channels
            before, after = head_err[0] / n, head_err[1] / n
        else:
            before, after = hold_sums.mse(), hold_sums.mse(g, beta)
        if not after < before:
            return LayerFit(name, stage, "rejected: no held-out improvement", before, after, stats)
        stats["compensation"] = Compensation(name, g, beta, self.axes[name], self.target, dict(stats))
        return LayerFit(name, stage, "compensated", before, after, stats)

    def _set_initializers(self, comp: Compensation) -> None:
        for suffix, value in (("gain", comp.gain), ("bias", comp.bias)):
            t = self.inits[f"{comp.layer}_cwac_{suffix}"]
            shape = tuple(t.dims)
            t.CopyFrom(onnx.numpy_helper.from_array(value.astype(np.float32).reshape(shape), t.name))


def _cache_extra(plan: SegmentPlan, k: int, out: dict[str, np.ndarray], cache: TensorCache, b: int) -> None:
    """Cache what segment ``k`` computed for later segments besides its stage's points (``SegmentPlan``)."""
    for t in plan.segments[k].outputs[plan.own_outputs[k]:]:
        cache.put(b, t, out[t])


@dataclasses.dataclass
class _Parts:
    """The fit part and the held-out part of the calibration set (streamed, not stored)."""

    fit: CalibrationSet
    hold: CalibrationSet
    batch_size: int

    @classmethod
    def split(cls, data: CalibrationSet, cfg: CwacConfig, batch_size: int) -> "_Parts":
        n = data.length if data.length is not None else sum(1 for _ in data)
        n_hold = max(1, int(round(n * cfg.holdout_fraction))) if n >= 4 else 0
        hold = data.take(n - n_hold, n) if n_hold else data.take(0, n)
        return cls(data.take(0, n - n_hold), hold, batch_size)


# The fit and its gate run one sample per onnxruntime call, whatever --batch-size says, so that the model
# they write does not depend on batching: onnxruntime's MatMul on a weight that is not a constant (a
# DequantizeLinear output, in every float-simulated QDQ graph) rounds differently for one row and for many
# (orientation's classifier MatMul: 5.5e-6 between a batch of 8 and 8 single runs, enough to move its
# fitted gains in the 7th digit).  Measured cost on orientation (48 samples, 2 cores under a load of ~6,
# two runs each): fit 18.4 s / 15.1 s one sample per call vs 15.0 s / 15.9 s in batches of 8 — within the
# machine's noise.
FIT_BATCH = 1


def fit_compensations(float_model: onnx.ModelProto, qmodel: onnx.ModelProto, plan: QuantPlan, data: CalibrationSet,
                      cfg: CwacConfig = CwacConfig(), batch_size: int = 8,
                      progress: Callable[[int, int], None] | None = None) -> CwacFit:
    """Fit CWAC for ``plan``'s layers of ``qmodel`` (plain QDQ) against ``float_model``.  ``batch_size`` is
    not used: the fit runs one sample per call (``FIT_BATCH``)."""
    t0 = time.perf_counter()
    parts = _Parts.split(data, cfg, FIT_BATCH)
    first = next(batches(parts.fit, parts.batch_size), None)
    if first is None:
        return CwacFit({}, "none", [], {}, 0, 0.0)
    candidates = ("global", "local") if cfg.target == "auto" else (cfg.target,)
    none = output_errors(float_model, qmodel, parts.hold, parts.batch_size, cfg.position_mask)
    scored: dict[str, OutputError] = {"none": none}
    results: dict[str, tuple] = {"none": ({}, [])}
    for target in candidates:
        comps, fits = _StagedFit(float_model, qmodel, plan, cfg, parts, target).run()
        results[target] = (comps, fits)
        scored[target] = (output_errors(float_model, _unfused(qmodel, comps), parts.hold, parts.batch_size,
                                        cfg.position_mask) if comps else none)
        logger.info("cwac %s: %d/%d layers compensated, held-out output error %.4g (none: %.4g)", target,
                    len(comps), len(fits), scored[target].total, none.total)
        if progress:
            progress(1, len(candidates))
    scores = {t: e.total for t, e in scored.items()}
    best, vetoed = gate_choice(scored)
    for t in vetoed:
        logger.info("cwac %s vetoed: held-out decision agreement with float %.4f < none's %.4f", t,
                    scored[t].decisions, none.decisions)
    comps, fits = results[best]
    fits = fits or results[candidates[0]][1]
    per_sample = {t: e.per_sample for t, e in scored.items() if e.per_sample is not None}
    decisions = {t: e.decisions for t, e in scored.items() if e.decisions is not None}
    return CwacFit(comps, best, fits, scores, max((f.stage for f in fits), default=0), time.perf_counter() - t0,
                   per_sample=per_sample if len(per_sample) == len(scored) else {}, decisions=decisions,
                   vetoed=vetoed)


def gate_given(float_model: onnx.ModelProto, qmodel: onnx.ModelProto, comps: dict[str, Compensation],
               data: CalibrationSet, cfg: CwacConfig = CwacConfig(), batch_size: int = 8) -> CwacFit:
    """Compensation fitted elsewhere (``--cwac-params``) measured by the same output gate as a fitted one,
    on the held-out part of the calibration set.  It is folded as asked — the user gave it explicitly —
    but the record carries both held-out errors and decision agreements, and ``gate_choice``'s verdict
    (``rejected_by_gate``), which the compile summary prints as a warning: a zero or absurd gain no
    longer passes silently."""
    t0 = time.perf_counter()
    parts = _Parts.split(data, cfg, FIT_BATCH)
    scored = {"none": output_errors(float_model, qmodel, parts.hold, parts.batch_size, cfg.position_mask)}
    if comps:
        scored["params"] = output_errors(float_model, _unfused(qmodel, comps), parts.hold, parts.batch_size,
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


def check_position_mask(cfg: CwacConfig, specs: list[InputSpec], data: CalibrationSet) -> None:
    """``--cwac-position-mask`` must name a [batch, seq] input of the model (checked on the first sample,
    before any heavy work)."""
    name = cfg.position_mask
    if not cfg.enabled or name is None:
        return
    inputs = [s.name for s in specs]
    if name not in inputs:
        raise QwtError(f"--cwac-position-mask names '{name}', which is not an input of the model",
                       notes=[f"inputs: {', '.join(inputs)}"], fix="name the attention-mask input, e.g. attention_mask")
    first = next(batches(data, 1), None)
    if first is not None and first[0][name].ndim != 2:
        shape = list(first[0][name].shape)
        raise QwtError(f"the position mask '{name}' has shape {shape}, not [batch, seq]",
                       fix="name a rank-2 attention mask (nonzero = a real token), or leave the option out")


def staged_fit(float_model: onnx.ModelProto, qmodel: onnx.ModelProto, plan: QuantPlan, data: CalibrationSet,
               target: str, cfg: CwacConfig = CwacConfig(), batch_size: int = 8,
               ) -> tuple[dict[str, Compensation], list[LayerFit]]:
    """One target's staged fit with the per-layer gate only (no output-level choice)."""
    return _StagedFit(float_model, qmodel, plan, cfg, _Parts.split(data, cfg, batch_size), target).run()


def _unfused(qmodel: onnx.ModelProto, comps: dict[str, Compensation]) -> onnx.ModelProto:
    return export_model(InsertCompensationPass(comps)(gs.import_onnx(qmodel)).graph)
