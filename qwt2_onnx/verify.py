"""A compile's checks in one pass: every model runs once per sample, and every comparison reads those runs.

A compile compares five graphs on the evaluation samples::

    float (optimized) ──┬─ plain PTQ (simulated) ........ comparison 3, plain vs float   + fidelity baseline
                        ├─ CWAC fused (simulated) ....... comparison 3, CWAC vs float    + fidelity simulated
                        └─ CWAC fused (deployed) ........ fidelity deployed
    CWAC unfused (simulated) ─┬─ CWAC fused (simulated) . comparison 1, the fold check (forced + free)
                              └─ CWAC fused (deployed) .. comparison 2, deployed vs simulated

Each graph runs once per sample (one sample per call, like the CWAC fit, so that no number depends on
``--batch-size``), fetching what all its comparisons need, and its tensors are dropped as soon as the
comparisons that read them are fed.  The statistics are
the accumulators of :mod:`equivalence` and :mod:`checker`; the standalone ``check_fold``,
``deployed_comparison`` and ``layer_comparison`` (the ``check`` and ``diff`` commands) use the same ones.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx

from .calib_data import CalibrationSet
from .checker import Comparison, DeployedAccumulator, LayerAccumulator
from .diffstats import DiffAccumulator
from .equivalence import FoldAccumulator, FoldCheck
from .fidelity import FidelityReport
from .runtime import batches, make_session, with_outputs


@dataclasses.dataclass(frozen=True)
class Verification:
    """What the pass measured; ``None`` where it was not asked for."""

    fold: FoldCheck | None  # comparison 1 (CWAC only)
    deployed: Comparison | None  # comparison 2 (CWAC and report)
    plain_vs_float: Comparison | None  # comparison 3 (report)
    cwac_vs_float: Comparison | None  # comparison 3 (CWAC and report)
    fidelity: FidelityReport | None


class _Graph:
    """One graph's session, fetching its outputs and ``fetch``."""

    def __init__(self, model: onnx.ModelProto, optimized: bool, fetch: dict[str, int]):
        outputs = [o.name for o in model.graph.output]
        self.names = outputs + [t for t in fetch if t not in outputs]
        self.session = make_session(with_outputs(model, fetch) if fetch else model, optimized=optimized, arena=False)

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.names, self.session.run(self.names, feed)))


def _outputs(model: onnx.ModelProto) -> dict[str, DiffAccumulator]:
    return {o.name: DiffAccumulator(o.name) for o in model.graph.output}


def verify_compile(float_model: onnx.ModelProto, plain: onnx.ModelProto, qmodel: onnx.ModelProto,
                   unfused: onnx.ModelProto | None, data: CalibrationSet, *, report: bool, fidelity: bool,
                   held_out: bool) -> Verification:
    """The compile's checks on ``data``.  ``unfused`` is the CWAC graph before folding (``None`` without
    CWAC: then ``qmodel`` is ``plain``); ``report``: comparisons 2 and 3; ``fidelity``: the summary."""
    run = _Pass(float_model, plain, qmodel, unfused, report, fidelity)
    samples = 0
    for feed, n in batches(data, 1):  # each graph's tensors are dropped as soon as what reads them is fed
        samples += n
        run.sample(feed)
    return run.result(samples, held_out)


class _Pass:
    """The accumulators of every comparison asked for, and each graph's session, built once; ``sample``
    runs every graph once on a feed and feeds each accumulator that reads it."""

    def __init__(self, float_model, plain, qmodel, unfused, report: bool, fidelity: bool):
        self.cwac = cwac = unfused is not None
        self.fold = FoldAccumulator(qmodel, unfused) if cwac else None
        self.deployed = DeployedAccumulator(qmodel, unfused) if cwac and report else None
        self.plain_cmp = plain_cmp = LayerAccumulator(float_model, plain, ("float", "plain PTQ")) if report else None
        self.cwac_cmp = cwac_cmp = LayerAccumulator(float_model, qmodel, ("float", "CWAC")) if cwac and report else None
        self.fid = {kind: _outputs(float_model) for kind in ("simulated", "deployed") + (("baseline",) if cwac else ())} \
            if fidelity else {}
        self.outputs = [o.name for o in float_model.graph.output]
        f_fetch = {**(plain_cmp.ref_fetch if plain_cmp else {}), **(cwac_cmp.ref_fetch if cwac_cmp else {})}
        self.g_float = _Graph(float_model, True, f_fetch)
        self.g_plain = _Graph(plain, False, plain_cmp.cand_fetch if plain_cmp else {}) \
            if plain_cmp or not cwac or "baseline" in self.fid else None
        self.g_unfused = self.g_fused = self.g_deployed = None
        if cwac:
            self.g_unfused = _Graph(unfused, False, {**self.fold.u_fetch, **(self.deployed.sim_fetch if self.deployed else {})})
            self.g_fused = _Graph(qmodel, False, {**self.fold.fetch, **(cwac_cmp.cand_fetch if cwac_cmp else {})})
        if self.deployed or fidelity:
            self.g_deployed = _Graph(qmodel, True, self.deployed.dep_fetch if self.deployed else {})

    def _fidelity(self, kind: str, f: dict, c: dict) -> None:
        for o, a in self.fid.get(kind, {}).items():
            a.update(f[o], c[o])

    def sample(self, feed: dict[str, np.ndarray]) -> None:
        cwac, fold = self.cwac, self.fold
        f = self.g_float.run(feed)
        c = None
        if self.g_plain is not None:
            p = self.g_plain.run(feed)
            if self.plain_cmp:
                self.plain_cmp.update(f, p)
            self._fidelity("baseline" if cwac else "simulated", f, p)
            c = None if cwac else p
            del p
        u = None
        if cwac:
            c = self.g_fused.run(feed)
            if self.cwac_cmp:
                self.cwac_cmp.update(f, c)
            self._fidelity("simulated", f, c)
            c = {t: c[t] for t in fold.free_names}  # the fold check needs only the outputs and the codes
            f = {o: f[o] for o in self.outputs}
            u = self.g_unfused.run(feed)
        if self.g_deployed is not None:
            d = self.g_deployed.run(feed)
            if self.deployed:
                self.deployed.update(d, u)
            self._fidelity("deployed", f, d)
            del d
        if cwac:  # last, with the least held: it runs the forced pair, whose fetches are the largest
            fold.update(feed, {t: u[t] for t in fold.u_names}, c)
        del c, f, u

    def result(self, samples: int, held_out: bool) -> Verification:
        fid_report = None
        if self.fid:
            result = {kind: {o: a.result() for o, a in accs.items()} for kind, accs in self.fid.items()}
            fid_report = FidelityReport(result["simulated"], result["deployed"], samples, held_out,
                                        result.get("baseline"))
        return Verification(
            self.fold.result() if self.fold else None,
            self.deployed.result(("unfused", "fused")) if self.deployed else None,
            self.plain_cmp.result("plain PTQ (float simulation) vs float", ("float", "plain PTQ"), role="plain_vs_float")
            if self.plain_cmp else None,
            self.cwac_cmp.result("CWAC (fused, float simulation) vs float", ("float", "CWAC"), role="cwac_vs_float")
            if self.cwac_cmp else None,
            fid_report)
