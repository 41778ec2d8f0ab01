"""Everything the terminal shows: a compile's summary (``render_summary``) and a check report's verdicts
(``render_terminal``).  Dumb: reads records, formats text."""
from __future__ import annotations

from collections import Counter


def render_summary(result) -> str:
    lines = [f"wrote {result.output_path}"]
    plan = result.plan
    lines.append(f"quantized {len(plan.layers)} layers; kept float: {len(plan.skipped)}")
    for reason, n in sorted(Counter(plan.skipped.values()).items()):
        lines.append(f"  float ({reason}): {n}")
    if plan.left_float:
        named = ", ".join(f"'{name}' ({what})" for name, what in list(plan.left_float.items())[:8])
        more = f" and {len(plan.left_float) - 8} more" if len(plan.left_float) > 8 else ""
        lines.append(f"  left in float (quantized around): {named}{more}")
    if plan.unmatched_patterns:
        lines.append(f"  exclusion patterns that matched nothing: {', '.join(plan.unmatched_patterns)}")
    for line in result.stages.load.repaired_declarations:
        lines.append(f"  note: {line}")
    for line in result.stages.load.warnings:
        lines.append(f"  warning: {line}")
    lines += _coarse_grid_lines(result.stages.plan.coarse_weight_grids if result.stages.plan else None)
    if result.stages.simplify.onnxsim.startswith("skipped"):
        lines.append(f"  note: onnxsim {result.stages.simplify.onnxsim}")
    if result.fusion:
        lines.append(f"onnxruntime: {result.fusion.summary()}")
        for layer, why in list(result.fusion.float_.items())[:8]:
            lines.append(f"  {layer}: {why}")
        if len(result.fusion.float_) > 8:
            lines.append(f"  ... and {len(result.fusion.float_) - 8} more")
    if result.cwac is not None:
        lines += cwac_lines(result)
    fid = result.fidelity
    if fid:
        tag = "held-out" if fid.held_out else "in-sample"
        lines.append(f"output fidelity vs float on {fid.samples} {tag} calibration samples:")
        for name in fid.simulated:
            s, d = fid.simulated[name], fid.deployed[name]
            base = f" | plain PTQ simulated SQNR {fid.baseline[name].sqnr_db:.1f} dB" if fid.baseline else ""
            lines.append(f"  {name}: simulated SQNR {s.sqnr_db:.1f} dB cos {s.cosine:.5f} | "
                         f"deployed SQNR {d.sqnr_db:.1f} dB cos {d.cosine:.5f}{base}")
    if result.report is not None:
        from .compile_outputs import report_paths
        lines.append("check: " + render_terminal(result.report, max_lines=4).replace("\n", "\n  "))
        lines.append(f"report: {report_paths(result.output_path)[0]} and .html")
    times = " ".join(f"{k} {v:.1f}s" for k, v in result.seconds.items())
    lines.append(f"time: {times}")
    return "\n".join(lines)


def _coarse_grid_lines(coarse: dict | None) -> list[str]:
    """Upgrade mode: the input's per-tensor weight grids that leave most channels a handful of levels."""
    if not coarse:
        return []
    worst = sorted(coarse.items(), key=lambda kv: kv[1]["median_channel_steps"] / kv[1]["grid_steps"])
    named = ", ".join(f"'{name}' {r['median_channel_steps']:g} of {r['grid_steps']}" for name, r in worst[:3])
    more = f" and {len(worst) - 3} more" if len(worst) > 3 else ""
    return [f"  warning: per-tensor weight scales set by a few wide channels in {len(coarse)} layer(s) of the "
            f"input: the median channel spans only a few steps of the grid ({named}{more}).  CWAC keeps the "
            f"input's grid and cannot give those channels their bits back: quantize these weights per channel "
            f"where the model is quantized (onnxruntime: per_channel=True, with the weights stored as initializers; a weight held by a Constant node is quantized like an "
            f"activation, per tensor)"]


def cwac_lines(result) -> list[str]:
    fit, fold, check = result.cwac, result.stages.fold, result.fold_check
    errs = ", ".join(f"{k} {v:.3g}" for k, v in fit.output_error.items())
    lines = [f"CWAC: target {fit.target}, {len(fit.compensations)}/{len(result.plan.layers)} layers compensated "
             f"in {fit.stages} stages, fit {fit.seconds:.1f}s; held-out output error: {errs}"]
    if fit.rejected_by_gate:
        lines.append(f"  warning: the given compensation (--cwac-params) makes the model worse on held-out "
                     f"calibration samples (output error none {fit.output_error.get('none', 0):.3g} -> "
                     f"{fit.output_error.get('params', 0):.3g}"
                     + (f", decision agreement with float {fit.decisions['none']:.4f} -> {fit.decisions['params']:.4f}"
                        if "params" in fit.decisions else "")
                     + "); it was folded as asked: check how it was fitted, or drop --cwac-params")
    samples = fit.held_out_samples()
    if samples and samples.worse_than_none:
        from .report import held_out_account

        lines.append("  " + held_out_account(samples.to_dict()))
    for t in fit.vetoed:
        lines.append(f"  {t} not kept: it lowers held-out decision agreement with float (argmax of the softmax "
                     f"outputs) {fit.decisions['none']:.4f} → {fit.decisions[t]:.4f}")
    if fit.real_positions_layers:
        lines.append(f"  statistics and gates on real positions only (--cwac-position-mask): "
                     f"{fit.real_positions_layers} layers")
    rejected = Counter(f.status for f in fit.layers if f.status != "compensated")
    for status, n in sorted(rejected.items()):
        lines.append(f"  not compensated ({status}): {n}")
    for strategy, n in sorted(Counter(fold.strategies.values()).items()):
        lines.append(f"  fold: {strategy}: {n}")
    if fold.inserted_ops:
        lines.append(f"  extra ops inserted: {len(fold.inserted_ops)} ({', '.join(fold.inserted_ops[:5])})")
    if check is not None:
        lines.append(f"  fused vs unfused (same activation codes): max relative difference {check.worst_forced:.2g}; "
                     f"free-running: {check.flipped}/{check.codes} activation codes differ (rounding ties)")
    return lines


def render_terminal(report, max_lines: int = 12) -> str:
    """A ``checker.CheckReport`` in a few lines: failed verdicts first, one line per comparison, the verdict."""
    lines = []
    failed = [v for v in report.verdicts if not v.passed]
    shown = failed[:max_lines] if failed else [v for v in report.verdicts if v.kind == "output"][:max_lines]
    lines += [v.line() for v in shown]
    if len(failed) > max_lines:
        lines.append(f"... and {len(failed) - max_lines} more failures")
    for c in report.comparisons:
        outs = "; ".join(f"{k}: max|Δ| {s.max_abs:.3g}, SQNR {s.sqnr_db:.1f} dB" for k, s in list(c.outputs.items())[:3])
        lines.append(f"[{c.role}] {c.title}: {outs}")
        if c.code_lsb_histogram:
            total = sum(c.code_lsb_histogram.values())
            off = total - c.code_lsb_histogram.get(0, 0)
            lines.append(f"    activation codes differing: {off}/{total} (max {max(c.code_lsb_histogram)} LSB), "
                         f"at rounding ties: {c.tie_flips}")
    lines.append(("PASSED" if report.passed else "FAILED") + f" | {report.kind} | {len(report.verdicts)} verdicts, "
                 f"{len(failed)} failed | data {report.data.samples} samples sha256 "
                 f"{report.data.sha256[:12]}")
    return "\n".join(lines)
