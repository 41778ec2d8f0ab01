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

from ..calib_data import CalibrationSet, InputSpec
from ..config import CwacConfig
from ..errors import QwtError
from ..policy import QuantPlan
from ..runtime import batches, make_session, per_sample
from .closed_form import AffineMap, ChannelSums, fit_affine, real_positions, sigmoid_sq_error
from .fold import unfused_model
from .gate import FIT_BATCH, Parts, gate_choice, output_errors
from .graphs import FitGraphs
from .points import layer_stages, score_head_layers
from .records import Compensation, CwacFit, LayerFit, OutputError
from .reference import prefix_staged_fit
from .segments import SegmentPlan, TensorCache

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class StageTerms:
    """What a worker computed for one stage: per sample position ``b`` (fit part first, then held out) and
    layer, its chunks' channel-sum terms, in order; and the layers whose statistics counted real positions
    only."""

    sums: dict[int, dict[str, list[ChannelSums]]]
    masked: set[str]


class StageWorker:
    """The per-sample half of one candidate's staged fit, on sample positions ``[lo, hi)`` of the sequence
    fit part then held-out part (``Parts``), with its own boundary caches.  One process runs one worker over
    every position; a sharded compile runs one per shard (``cwac.shards``).  ``close()`` removes its caches."""

    def __init__(self, graphs: FitGraphs, cfg: CwacConfig, heads: set[str], parts: Parts, lo: int, hi: int):
        self.g, self.cfg, self.heads = graphs, cfg, heads
        budget = cfg.cache_mib * 2**20
        self.qcache, self.fcache = TensorCache(budget), TensorCache(budget)
        self.masks: dict[int, np.ndarray] = {}  # position -> cfg.position_mask's value
        self.batch_samples: dict[int, int] = {}  # position -> how many samples it holds
        self.held: dict[int, dict[str, list[tuple]]] = {}  # score heads' held-out (q, f, axis), this stage
        b = 0
        for part in (parts.fit, parts.hold):
            n_part = part.length if part.length is not None else sum(1 for _ in part)
            if b + n_part > lo and b < hi:
                start = max(lo - b, 0)
                for feed, n in batches(part.take(start, min(hi - b, n_part)), parts.batch_size):
                    self._seed(b + start, feed, n)
                    start += n
            b += n_part
            if part is parts.fit:
                self.n_fit = b
        self.positions = sorted(self.batch_samples)

    def _seed(self, b: int, feed: dict[str, np.ndarray], n: int) -> None:
        self.batch_samples[b] = n
        if self.cfg.position_mask:
            self.masks[b] = feed[self.cfg.position_mask]
        for name, value in feed.items():
            self.qcache.put(b, name, value)
            self.fcache.put(b, name, value)

    def stage(self, k: int, kept: list[Compensation]) -> StageTerms:
        """Stage ``k`` (0-based) on this worker's samples, after setting the compensations the previous stage
        kept: each layer's channel-sum terms per sample; score heads' held-out tensors stay here for
        :meth:`head_errors`."""
        g, names = self.g, self.g.members[k]
        for comp in kept:
            g.set_initializers(comp)
        q_plan, f_plan, qcache, fcache = g.q_plan, g.f_plan, self.qcache, self.fcache
        qseg = q_plan.segments[k]
        qsess = make_session(q_plan.extract(g.umodel, k, qcache.dtypes), optimized=False)
        fsess = fseg = None
        if f_plan is not None:
            fseg = f_plan.segments[k]
            # unoptimized, like the quantized side: onnxruntime's fusions differ between a segment and the
            # whole model, and their ulp-level differences in the target would change the staged result
            fsess = make_session(f_plan.extract(g.fmodel, k, fcache.dtypes), optimized=False)
        out = StageTerms({}, set())
        self.held = {}
        for b in self.positions:
            qout = dict(zip(qseg.outputs, qsess.run(list(qseg.outputs), {t: qcache.get(b, t) for t in qseg.inputs})))
            _cache_extra(q_plan, k, qout, qcache, b)
            if fsess is not None:
                fout = dict(zip(fseg.outputs, fsess.run(list(fseg.outputs), {t: fcache.get(b, t) for t in fseg.inputs})))
                _cache_extra(f_plan, k, fout, fcache, b)
                for name in names:
                    if g.fpoints[name] in f_plan.last_use:
                        fcache.put(b, g.fpoints[name], fout[g.fpoints[name]])
            n, mask = self.batch_samples[b], self.masks.get(b)
            out.sums[b] = {}
            for name in names:
                q = qout[g.raw[name]]
                f = qout[g.twins[name]] if g.target == "local" else fout[g.fpoints[name]]
                # sample by sample, in order: the same sums whatever the batch size (runtime.per_sample)
                qs, fs, ms = per_sample(q, n), per_sample(f, n), [mask]
                if len(qs) == len(fs) == n:
                    ms = per_sample(mask, n) if mask is not None else [None] * n
                else:
                    qs, fs = [q], [f]
                terms = out.sums[b][name] = []
                for qi, fi, mi in zip(qs, fs, ms):
                    axis, (qr, fr) = real_positions(mi, g.axes[name], qi, fi)
                    if qr is not qi:
                        out.masked.add(name)
                    terms.append(ChannelSums.terms(qr, fr, axis))
                    if name in self.heads and b >= self.n_fit:
                        self.held.setdefault(b, {}).setdefault(name, []).append((qr, fr, axis))
                if g.raw[name] in q_plan.last_use:
                    qcache.put(b, g.raw[name], q)
        for plan_, cache in ((q_plan, qcache), (f_plan, fcache)):
            if plan_ is not None:
                for t in [t for t, last in plan_.last_use.items() if last == k]:
                    cache.drop(t, self.positions)
        return out

    def head_errors(self, maps: dict[str, AffineMap]) -> dict[int, dict[str, list[tuple[float, float]]]]:
        """The score heads' held-out score error per chunk without / with their map (this stage's)."""
        errs = {b: {name: [(sigmoid_sq_error(q, f, axis), sigmoid_sq_error(q, f, axis, maps[name].gain, maps[name].bias))
                           for q, f, axis in chunks] for name, chunks in per.items()} for b, per in self.held.items()}
        self.held = {}
        return errs

    def close(self) -> None:
        self.qcache.close()
        self.fcache.close()


class _StagedFit:
    """One candidate target's staged fit, driven stage by stage over workers (:class:`StageWorker`): their
    per-sample terms are added in sample order, so the result does not depend on how the samples are split."""

    def __init__(self, float_model: onnx.ModelProto, qmodel: onnx.ModelProto, plan: QuantPlan, cfg: CwacConfig,
                 parts: Parts, target: str):
        self.cfg, self.target = cfg, target
        self.graphs = FitGraphs(float_model, qmodel, plan, target)
        self.heads = (score_head_layers(float_model, self.graphs.fpoints, next(batches(parts.fit, parts.batch_size))[0])
                      if cfg.head_fit == "spread" else set())
        self.parts = parts
        self.n_fit = parts.fit.length if parts.fit.length is not None else sum(1 for _ in parts.fit)

    def run(self, workers: list | None = None, gather: Callable | None = None,
            ) -> tuple[dict[str, Compensation], list[LayerFit]]:
        """``workers``: objects with :class:`StageWorker`'s ``stage`` / ``head_errors`` (default: one in this
        process over every sample); ``gather(workers, method, *args)``: every worker's result of the call, in
        worker order (default: one after another)."""
        own = workers is None
        if own:
            workers = [StageWorker(self.graphs, self.cfg, self.heads, self.parts, 0, 2**62)]
        try:
            return self._stages(workers, gather or gather_in_turn)
        finally:
            if own:
                workers[0].close()

    def _stages(self, workers: list, gather: Callable) -> tuple[dict[str, Compensation], list[LayerFit]]:
        comps, fits, kept = {}, [], []
        for k, names in enumerate(self.graphs.members):
            results = gather(workers, "stage", k, kept)
            masked = set().union(*(r.masked for r in results))
            sums: dict[tuple[str, str], ChannelSums] = {}
            for b, per in sorted((b, per) for r in results for b, per in r.sums.items()):
                for name in names:
                    for t in per[name]:
                        key = ("fit" if b < self.n_fit else "hold", name)
                        if key not in sums:
                            sums[key] = ChannelSums(t.channels, t.axis)
                        sums[key].add(t)
            maps = {name: fit_affine(sums[("fit", name)], self.cfg.lam, self.cfg.max_gain,
                                     keep_spread=name in self.heads) for name in names}
            head_err = {name: [0.0, 0.0] for name in names if name in self.heads}
            if head_err:
                heads = gather(workers, "head_errors", {name: maps[name] for name in head_err})
                for b, per in sorted((b, per) for r in heads for b, per in r.items()):
                    for name, chunks in per.items():
                        for before, after in chunks:
                            head_err[name][0] += before
                            head_err[name][1] += after
            kept = []
            for name in names:
                fit = self._judge(name, k + 1, maps[name], sums[("hold", name)], head_err.get(name), name in masked)
                fits.append(fit)
                if fit.kept:
                    comps[name] = fit.compensation
                    kept.append(fit.compensation)
        return comps, fits

    def _judge(self, name: str, stage: int, fitted: AffineMap, hold_sums: ChannelSums,
               head_err: list[float] | None, masked: bool) -> LayerFit:
        """Keep the layer's fitted map if it lowers the layer's held-out error: its output's MSE, or for a
        score head (``head_err``: held-out score error without / with the map) its scores' error."""
        g, beta, stats = fitted.gain, fitted.bias, dict(fitted.stats)
        if masked:
            stats["real_positions_only"] = True
        if head_err is not None:
            n = hold_sums.n * hold_sums.channels
            before, after = head_err[0] / n, head_err[1] / n
        else:
            before, after = hold_sums.mse(), hold_sums.mse(g, beta)
        kept = after < before
        return LayerFit(name, stage, kept, before, after, stats["fit"], stats["zero_variance"],
                        stats["rejected_channels"], masked,
                        Compensation(name, g, beta, self.graphs.axes[name], self.target, stats) if kept else None)


def gather_in_turn(workers: list, method: str, *args) -> list:
    """Every worker's result of ``method(*args)``, one worker after another (workers in this process)."""
    return [getattr(w, method)(*args) for w in workers]


def _cache_extra(plan: SegmentPlan, k: int, out: dict[str, np.ndarray], cache: TensorCache, b: int) -> None:
    """Cache what segment ``k`` computed for later segments besides its stage's points (``SegmentPlan``)."""
    for t in plan.segments[k].outputs[plan.own_outputs[k]:]:
        cache.put(b, t, out[t])


def fit_compensations(float_model: onnx.ModelProto, qmodel: onnx.ModelProto, plan: QuantPlan, data: CalibrationSet,
                      cfg: CwacConfig = CwacConfig(), batch_size: int = 8,
                      progress: Callable[[int, int], None] | None = None, shards=None) -> CwacFit:
    """Fit CWAC for ``plan``'s layers of ``qmodel`` (plain QDQ) against ``float_model``.  ``batch_size`` is
    not used: the fit runs one sample per call (``FIT_BATCH``).  ``shards``: a pool whose ``start(...)``
    returns stage workers over shards of the samples and ``stop(workers)`` ends them (``cwac.shards``);
    default: one worker in this process."""
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
            fit = _StagedFit(float_model, qmodel, plan, cfg, parts, target)
            if shards is None:
                comps, fits = fit.run()
            else:
                workers = shards.start(float_model, qmodel, plan, cfg, target, fit.heads, parts)
                try:
                    comps, fits = fit.run(workers, shards.gather)
                finally:
                    shards.stop(workers)
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


