"""The slow definition of the exact staged protocol, kept as the reference the fast one must equal.

:func:`prefix_staged_fit` re-runs the whole unfused prefix of the model for
every stage (O(stages) passes), with the same per-layer held-out gate as
:func:`qwt2_onnx.cwac.fit.staged_fit`.  ``tests/test_cwac.py`` checks that the
two agree and ``tools/bench_cwac_fit.py`` measures both; nothing else uses it.
"""
from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

from ..calib_data import CalibrationSet
from ..config import CwacConfig
from ..graph_queries import channel_axis, compensation_point
from ..policy import QuantPlan
from ..runtime import batches, make_session, with_outputs
from .closed_form import ChannelSums, fit_affine, real_positions, sigmoid_sq_error
from .fold import unfused_model
from .gate import Parts
from .points import layer_stages, score_head_layers
from .records import Compensation


def prefix_staged_fit(float_model: onnx.ModelProto, qmodel: onnx.ModelProto, plan: QuantPlan,
                      data: CalibrationSet, cfg: CwacConfig = CwacConfig(), batch_size: int = 8,
                      ) -> dict[str, Compensation]:
    """The exact protocol the slow way, global target: per stage, run the whole unfused prefix (O(stages)
    passes).  The definition :func:`staged_fit` is tested and benchmarked against."""
    qgraph = gs.import_onnx(qmodel)
    nodes = {n.name: n for n in qgraph.nodes}
    layers = [lp.node for lp in plan.layers]
    stages = layer_stages(qmodel, layers)
    points = {name: compensation_point(nodes[name]).name for name in layers}
    axes = {lp.node: channel_axis(lp.op) for lp in plan.layers}
    parts = Parts.split(data, cfg, batch_size)
    heads = (score_head_layers(float_model, points, next(batches(parts.fit, parts.batch_size))[0])
             if cfg.head_fit == "spread" else set())
    comps: dict[str, Compensation] = {}
    for s in range(1, max(stages.values(), default=0) + 1):
        members = [n for n in layers if stages[n] == s]
        outs = [points[n] for n in members]  # no member is compensated yet: its point keeps its name
        qs = make_session(with_outputs(unfused_model(qmodel, comps) if comps else qmodel, outs), optimized=False)
        fs = make_session(with_outputs(float_model, outs), optimized=False)  # as staged_fit: same float32 sums
        sums: dict[tuple[str, str], ChannelSums] = {}
        maps, head_err = {}, {name: [0.0, 0.0] for name in members if name in heads}
        for part, part_data in (("fit", parts.fit), ("hold", parts.hold)):
            if part == "hold":
                maps = {name: fit_affine(sums[("fit", name)], cfg.lam, cfg.max_gain, keep_spread=name in heads)
                        for name in members}
            for feed, _ in batches(part_data, parts.batch_size):
                mask = feed[cfg.position_mask] if cfg.position_mask else None
                for name, q, f in zip(members, qs.run(outs, feed), fs.run(outs, feed)):
                    axis, (q, f) = real_positions(mask, axes[name], q, f)
                    sums.setdefault((part, name), ChannelSums(q.shape[axis], axis)).update(q, f)
                    if part == "hold" and name in heads:
                        head_err[name][0] += sigmoid_sq_error(q, f, axis)
                        head_err[name][1] += sigmoid_sq_error(q, f, axis, maps[name].gain, maps[name].bias)
        for name in members:
            g, beta, stats = maps[name].gain, maps[name].bias, maps[name].stats
            hold = sums[("hold", name)]
            better = head_err[name][1] < head_err[name][0] if name in heads else hold.mse(g, beta) < hold.mse()
            if better:
                comps[name] = Compensation(name, g, beta, axes[name], "global", stats)
    return comps
