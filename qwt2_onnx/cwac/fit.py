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

import logging
import time
from collections.abc import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..calib_data import CalibrationSet, InputSpec
from ..config import CwacConfig
from ..errors import QwtError
from ..graph_io import export_model
from ..graph_queries import channel_axis, compensation_point, weight_shape
from ..passes.insert_compensation import InsertCompensationPass
from ..policy import QuantPlan
from ..runtime import batches, make_session, per_sample
from .closed_form import AffineMap, ChannelSums, fit_affine, real_positions, sigmoid_sq_error
from .fold import unfused_model
from .gate import FIT_BATCH, Parts, gate_choice, output_errors
from .points import float_point, layer_stages, score_head_layers
from .records import Compensation, CwacFit, LayerFit, OutputError
from .reference import prefix_staged_fit
from .segments import SegmentPlan, TensorCache

logger = logging.getLogger(__name__)


def _identity(plan: QuantPlan, graph: gs.Graph) -> dict[str, Compensation]:
    """g = 1, β = 0 for every layer: the unfused graph's structure, before any fit."""
    nodes = {n.name: n for n in graph.nodes}
    comps = {}
    for lp in plan.layers:
        c = weight_shape(nodes[lp.node])[lp.axis]
        comps[lp.node] = Compensation(lp.node, np.ones(c, np.float32), np.zeros(c, np.float32), channel_axis(lp.op), "none", {})
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
                 parts: Parts, target: str):
        self.plan, self.cfg, self.parts, self.target = plan, cfg, parts, target
        qgraph = gs.import_onnx(qmodel)
        nodes = {n.name: n for n in qgraph.nodes}
        self.layers = [lp.node for lp in plan.layers]
        self.stages = layer_stages(qmodel, self.layers)
        self.points = {name: compensation_point(nodes[name]).name for name in self.layers}
        fgraph = gs.import_onnx(float_model)
        fnodes = {n.name: n for n in fgraph.nodes}
        self.fpoints = {name: float_point(nodes[name], fnodes) for name in self.layers}
        self.axes = {lp.node: channel_axis(lp.op) for lp in plan.layers}
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
                    if fit.kept:
                        comps[name] = fit.compensation
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
        maps: dict[str, AffineMap] = {}
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
                        head_err[name][1] += sigmoid_sq_error(qr, fr, axis, maps[name].gain, maps[name].bias)
                if self.raw[name] in q_plan.last_use:
                    qcache.put(b, self.raw[name], q)
        return maps, {name: sums[("hold", name)] for name in names}, head_err

    def _judge(self, name: str, stage: int, fitted: AffineMap, hold_sums: ChannelSums,
               head_err: list[float] | None = None) -> LayerFit:
        """Keep the layer's fitted map if it lowers the layer's held-out error: its output's MSE, or for a
        score head (``head_err``: held-out score error without / with the map) its scores' error."""
        g, beta, stats = fitted.gain, fitted.bias, dict(fitted.stats)
        if name in self.masked:
            stats["real_positions_only"] = True
        if head_err is not None:
            n = hold_sums.n * hold_sums.channels
            before, after = head_err[0] / n, head_err[1] / n
        else:
            before, after = hold_sums.mse(), hold_sums.mse(g, beta)
        kept = after < before
        return LayerFit(name, stage, kept, before, after, stats["fit"], stats["zero_variance"],
                        stats["rejected_channels"], name in self.masked,
                        Compensation(name, g, beta, self.axes[name], self.target, stats) if kept else None)

    def _set_initializers(self, comp: Compensation) -> None:
        for suffix, value in (("gain", comp.gain), ("bias", comp.bias)):
            t = self.inits[f"{comp.layer}_cwac_{suffix}"]
            shape = tuple(t.dims)
            t.CopyFrom(onnx.numpy_helper.from_array(value.astype(np.float32).reshape(shape), t.name))


def _cache_extra(plan: SegmentPlan, k: int, out: dict[str, np.ndarray], cache: TensorCache, b: int) -> None:
    """Cache what segment ``k`` computed for later segments besides its stage's points (``SegmentPlan``)."""
    for t in plan.segments[k].outputs[plan.own_outputs[k]:]:
        cache.put(b, t, out[t])


def fit_compensations(float_model: onnx.ModelProto, qmodel: onnx.ModelProto, plan: QuantPlan, data: CalibrationSet,
                      cfg: CwacConfig = CwacConfig(), batch_size: int = 8,
                      progress: Callable[[int, int], None] | None = None) -> CwacFit:
    """Fit CWAC for ``plan``'s layers of ``qmodel`` (plain QDQ) against ``float_model``.  ``batch_size`` is
    not used: the fit runs one sample per call (``FIT_BATCH``)."""
    t0 = time.perf_counter()
    parts = Parts.split(data, cfg, FIT_BATCH)
    first = next(batches(parts.fit, parts.batch_size), None)
    if first is None:
        return CwacFit({}, "none", [], {}, 0, 0.0)
    candidates = ("global", "local") if cfg.target == "auto" else (cfg.target,)
    none = output_errors(float_model, qmodel, parts.hold, parts.batch_size, cfg.position_mask)
    scored: dict[str, OutputError] = {"none": none}
    results: dict[str, tuple] = {"none": ({}, [])}
    for target in candidates:
        if cfg.protocol == "prefix":  # the slow definition (benchmarks), judged by the same output gate
            comps, fits = prefix_staged_fit(float_model, qmodel, plan, data, cfg, parts.batch_size), []
        else:
            comps, fits = _StagedFit(float_model, qmodel, plan, cfg, parts, target).run()
        results[target] = (comps, fits)
        scored[target] = (output_errors(float_model, unfused_model(qmodel, comps), parts.hold, parts.batch_size,
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
    n_stages = max(layer_stages(qmodel, [lp.node for lp in plan.layers]).values(), default=0)
    return CwacFit(comps, best, fits, scores, n_stages, time.perf_counter() - t0,
                   per_sample=per_sample if len(per_sample) == len(scored) else {}, decisions=decisions,
                   vetoed=vetoed)


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
    return _StagedFit(float_model, qmodel, plan, cfg, Parts.split(data, cfg, batch_size), target).run()


