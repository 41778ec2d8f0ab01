"""Terminal rendering of a CompileResult (dumb: reads records, formats text)."""
from __future__ import annotations

from collections import Counter


def render_summary(result) -> str:
    lines = [f"wrote {result.output_path}"]
    plan = result.plan
    lines.append(f"quantized {len(plan.layers)} layers; kept float: {len(plan.skipped)}")
    for reason, n in sorted(Counter(plan.skipped.values()).items()):
        lines.append(f"  float ({reason}): {n}")
    if plan.unmatched_patterns:
        lines.append(f"  exclusion patterns that matched nothing: {', '.join(plan.unmatched_patterns)}")
    if result.stages.get("simplify", {}).get("onnxsim", "").startswith("skipped"):
        lines.append(f"  note: onnxsim {result.stages['simplify']['onnxsim']}")
    if result.fusion:
        lines.append(f"onnxruntime: {result.fusion.summary()}")
        for layer, why in list(result.fusion.float_.items())[:8]:
            lines.append(f"  {layer}: {why}")
        if len(result.fusion.float_) > 8:
            lines.append(f"  ... and {len(result.fusion.float_) - 8} more")
    fid = result.fidelity
    if fid:
        tag = "held-out" if fid.held_out else "in-sample"
        lines.append(f"output fidelity vs float on {fid.samples} {tag} calibration samples:")
        for name in fid.simulated:
            s, d = fid.simulated[name], fid.deployed[name]
            lines.append(f"  {name}: simulated SQNR {s.sqnr_db:.1f} dB cos {s.cosine:.5f} | "
                         f"deployed SQNR {d.sqnr_db:.1f} dB cos {d.cosine:.5f}")
    times = " ".join(f"{k} {v:.1f}s" for k, v in result.seconds.items())
    lines.append(f"time: {times}")
    return "\n".join(lines)
