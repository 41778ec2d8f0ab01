"""The staged CWAC fit (DESIGN.md §2): exact protocol, global or local targets.

Stages: a layer's stage is 1 + the largest stage of the quantized layers
upstream of it, so layers in one stage have no path between them (q/k/v
projections share a stage).  Stage s is fitted on the quantized model with
every compensation of stages < s already applied (explicit Mul/Add), so no
upstream error is compensated twice.

Per stage, one streaming pass over the calibration samples runs the *prefix*
of the unfused quantized model that ends at the stage's compensation points,
and (global target) the same prefix of the float model, accumulating five
per-channel sums per layer.  Samples are split into a fit part and a held-out
part; a layer whose fitted map does not lower its own error on the held-out
part is left uncompensated (recorded).

Targets:
* ``global``: f = the float model's tensor at the compensation point, same sample;
* ``local``:  f = the float layer applied to the quantized model's own input
  at that layer (corrects only the layer's own weight error).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .calib_data import CalibrationSet
from .cwac import ChannelSums, Compensation, fit_affine
from .graph_io import export_model
from .passes.insert_compensation import InsertCompensationPass, compensation_point
from .policy import QuantPlan
from .runtime import BatchRunner, make_session

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CwacConfig:
    target: str = "global"  # or "local"
    lam: float = 0.0
    max_gain: float = 4.0
    holdout_fraction: float = 0.25
    batch_size: int = 8


@dataclasses.dataclass
class LayerFit:
    layer: str
    stage: int
    status: str  # "compensated" | "rejected: ..." 
    mse_before: float
    mse_after: float
    stats: dict


def layer_stages(graph: gs.Graph, layers: list[str]) -> dict[str, int]:
    """Stage of each layer: 1 + max stage of quantized layers upstream."""
    wanted = set(layers)
    depth: dict[str, int] = {}  # tensor name -> max stage upstream
    stages = {}
    for node in graph.toposort().nodes:
        d = max((depth.get(t.name, 0) for t in node.inputs), default=0)
        if node.name in wanted:
            d += 1
            stages[node.name] = d
        for t in node.outputs:
            depth[t.name] = d
    return stages


def _prefix(model: onnx.ModelProto, outputs: list[str]) -> onnx.ModelProto:
    """The part of ``model`` that computes ``outputs`` (which become its only outputs)."""
    graph = gs.import_onnx(model)
    tensors = graph.tensors()
    graph.outputs = [tensors[name] for name in outputs]
    for t in graph.outputs:
        if t.dtype is None:
            t.dtype = np.float32
    graph.cleanup()
    return export_model(graph)


def _unfused(qmodel: onnx.ModelProto, comps: dict[str, Compensation]) -> onnx.ModelProto:
    if not comps:
        return qmodel
    return export_model(InsertCompensationPass(comps)(gs.import_onnx(qmodel)).graph)


def fit_compensations(float_model: onnx.ModelProto, qmodel: onnx.ModelProto, plan: QuantPlan,
                      data: CalibrationSet, cfg: CwacConfig = CwacConfig(),
                      progress: Callable[[int, int], None] | None = None) -> tuple[dict[str, Compensation], list[LayerFit]]:
    qgraph = gs.import_onnx(qmodel)
    nodes = {n.name: n for n in qgraph.nodes}
    layers = [lp.node for lp in plan.layers]
    stages = layer_stages(qgraph, layers)
    points = {name: compensation_point(nodes[name]).name for name in layers}
    axes = {lp.node: 1 if lp.op in ("Conv", "ConvTranspose") else -1 for lp in plan.layers}
    n = data.length or sum(1 for _ in data)
    n_hold = max(1, int(round(n * cfg.holdout_fraction))) if n >= 4 else 0
    fit_part, hold_part = data.take(0, n - n_hold), data.take(n - n_hold, n)
    comps: dict[str, Compensation] = {}
    fits: list[LayerFit] = []
    n_stages = max(stages.values(), default=0)
    for s in range(1, n_stages + 1):
        t0 = time.perf_counter()
        members = [name for name in layers if stages[name] == s]
        outs = [points[name] for name in members]
        qsess = make_session(_prefix(_unfused(qmodel, comps), outs), optimized=False)
        fsess = make_session(_prefix(float_model, outs), optimized=True)
        sums = {}
        for part_name, part in (("fit", fit_part), ("hold", hold_part)):
            for name in members:
                sums[(part_name, name)] = None
            for (qout, fout), _ in BatchRunner([qsess, fsess], cfg.batch_size).run(part, outs):
                for name, point in zip(members, outs):
                    q, f = qout[point], fout[point]
                    key = (part_name, name)
                    if sums[key] is None:
                        sums[key] = ChannelSums(q.shape[axes[name]], axes[name])
                    sums[key].update(q, f)
        for name in members:
            fit_sums, hold_sums = sums[("fit", name)], sums[("hold", name)] or sums[("fit", name)]
            g, beta, stats = fit_affine(fit_sums, cfg.lam, cfg.max_gain)
            before, after = hold_sums.mse(), hold_sums.mse(g, beta)
            if after < before:
                comps[name] = Compensation(name, g, beta, axes[name], cfg.target, stats)
                status = "compensated"
            else:
                status = "rejected: no held-out improvement"
            fits.append(LayerFit(name, s, status, before, after, stats))
        logger.debug("stage %d/%d: %d layers, %.2fs", s, n_stages, len(members), time.perf_counter() - t0)
        if progress:
            progress(1, n_stages)
    return comps, fits
