"""Files of a :class:`checker.CheckReport`: JSON (versioned schema) and self-contained HTML (the terminal text is
:mod:`render`'s).

Dumb by design: they only read the records.  The JSON schema is
``qwt2_onnx/data/check_report.schema.json``, documented in docs/REPORT.md.
Infinite SQNR (no error at all) is written as ``null`` in JSON.
"""
from __future__ import annotations

import dataclasses
import html
import json
import math

from .checker import CheckReport, Comparison
from .cwac.records import GateRecord
from .diffstats import HIST_EDGES, DiffStats

PALETTE = {"plain": "#d62728", "cwac": "#1f77b4", "bar": "#1f77b4", "pass": "#2ca02c", "fail": "#d62728"}


def _num(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _stats(s: DiffStats) -> dict:
    d = {k: _num(v) for k, v in dataclasses.asdict(s).items()}
    d["max_lsb"] = _num(s.max_lsb)
    return d


def to_json(report: CheckReport) -> dict:
    def verdict(v):
        return {**{k: _num(x) for k, x in dataclasses.asdict(v).items()}, "line": v.line()}

    return {
        "schema": report.schema, "kind": report.kind, "created": report.created, "passed": report.passed,
        "models": report.models, "data": report.data.to_dict(),
        "verdicts": [verdict(v) for v in report.verdicts],
        "comparisons": [{
            "title": c.title, "role": c.role, "reference": c.reference, "candidate": c.candidate,
            "passed": c.passed, "notes": c.notes,
            "outputs": {k: _stats(s) for k, s in c.outputs.items()},
            "layers": {k: _stats(s) for k, s in c.layers.items()},
            "verdicts": [verdict(v) for v in c.verdicts],
            "code_lsb_histogram": None if c.code_lsb_histogram is None else
            {str(k): v for k, v in c.code_lsb_histogram.items()},
            "tie_flips": c.tie_flips} for c in report.comparisons],
        "cwac_layers": [row.to_dict() for row in report.cwac_layers],
        "cwac_gate": report.cwac_gate.to_dict() if report.cwac_gate is not None else None,
        "histogram_edges": [float(e) for e in HIST_EDGES],
    }


def dumps(report: CheckReport) -> str:
    return json.dumps(to_json(report), indent=1, sort_keys=True, allow_nan=False) + "\n"


# ---------------------------------------------------------------- HTML

def _svg_bars(title: str, labels: list[str], series: dict[str, list[float | None]], colors: dict[str, str],
              ylabel: str, width: int = 900, height: int = 260) -> str:
    """A grouped bar chart as inline SVG (one group per label)."""
    vals = [v for vs in series.values() for v in vs if v is not None and math.isfinite(v)]
    if not labels or not vals:
        return f"<p><em>{html.escape(title)}: nothing to plot</em></p>"
    lo, hi = min(0.0, min(vals)), max(vals) or 1.0
    left, bottom, top = 50, 30, 24
    plot_w, plot_h = width - left - 10, height - bottom - top
    group_w = plot_w / len(labels)
    bar_w = max(group_w / (len(series) + 1), 1.0)
    y = lambda v: top + plot_h * (1 - (v - lo) / ((hi - lo) or 1.0))  # noqa: E731
    parts = [f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'role="img" aria-label="{html.escape(title)}">',
             f'<text x="{left}" y="16" font-size="13" font-weight="bold">{html.escape(title)}</text>',
             f'<line x1="{left}" y1="{y(lo)}" x2="{width - 10}" y2="{y(lo)}" stroke="#888"/>',
             f'<text x="4" y="{top + 10}" font-size="11">{hi:.3g}</text>',
             f'<text x="4" y="{top + plot_h}" font-size="11">{lo:.3g}</text>',
             f'<text x="4" y="{height - 6}" font-size="11">{html.escape(ylabel)}</text>']
    for i, label in enumerate(labels):
        for j, (name, vs) in enumerate(series.items()):
            v = vs[i]
            if v is None or not math.isfinite(v):
                continue
            x0, y0, y1 = left + i * group_w + j * bar_w, y(max(v, lo)), y(lo)
            parts.append(f'<rect class="bar" x="{x0:.1f}" y="{min(y0, y1):.1f}" width="{bar_w:.1f}" '
                         f'height="{abs(y1 - y0):.1f}" fill="{colors[name]}"><title>{html.escape(label)} '
                         f'{html.escape(name)}: {v:.3g}</title></rect>')
    legend_x = width - 10 - 120 * len(series)
    for j, name in enumerate(series):
        parts.append(f'<rect x="{legend_x + 120 * j}" y="6" width="10" height="10" fill="{colors[name]}"/>'
                     f'<text x="{legend_x + 120 * j + 14}" y="15" font-size="11">{html.escape(name)}</text>')
    return "".join(parts) + "</svg>"


def _error_histogram(s: DiffStats) -> str:
    counts = s.histogram
    nz = [i for i, c in enumerate(counts) if c]
    if not nz:
        return ""
    lo, hi = nz[0], nz[-1] + 1
    labels = ["<1e-12" if i == 0 else f"{HIST_EDGES[i - 1]:.0e}" for i in range(lo, hi)]
    return _svg_bars(f"|Δ| histogram, {s.name}", labels, {"elements": [float(counts[i]) for i in range(lo, hi)]},
                     {"elements": PALETTE["bar"]}, "count", height=200)


def _table(rows: dict[str, DiffStats], limit: int = 40) -> str:
    head = ("<tr><th>tensor</th><th>max |Δ|</th><th>worst index</th><th>mean |Δ|</th><th>p99 |Δ|</th>"
            "<th>max rel</th><th>cosine</th><th>SQNR dB</th><th>max LSB</th></tr>")
    body = []
    for name, s in list(rows.items())[:limit]:
        lsb = f"{s.max_lsb:.3g}" if s.max_lsb is not None else "–"
        body.append(f"<tr><td>{html.escape(name)}</td><td>{s.max_abs:.3g}</td><td>{s.worst_index}</td>"
                    f"<td>{s.mean_abs:.3g}</td><td>{s.p99_abs:.3g}</td><td>{s.max_rel:.3g}</td>"
                    f"<td>{s.cosine:.6f}</td><td>{s.sqnr_db:.1f}</td><td>{lsb}</td></tr>")
    more = f"<p>... {len(rows) - limit} more in the JSON report</p>" if len(rows) > limit else ""
    return f"<table>{head}{''.join(body)}</table>{more}"


def _sqnr_chart(report: CheckReport) -> str:
    by_role = {c.role: c for c in report.comparisons}
    plain, cwac = by_role.get("plain_vs_float"), by_role.get("cwac_vs_float")
    if plain is None or cwac is None:
        return ""
    labels = [k for k in plain.layers if k in cwac.layers]
    series = {"plain PTQ": [_finite(plain.layers[k].sqnr_db) for k in labels],
              "CWAC": [_finite(cwac.layers[k].sqnr_db) for k in labels]}
    chart = _svg_bars("Per-layer SQNR vs float (dB), before / after CWAC, in graph order", labels, series,
                      {"plain PTQ": PALETTE["plain"], "CWAC": PALETTE["cwac"]}, "layer →", height=300)
    worst = sorted(labels, key=lambda k: plain.layers[k].sqnr_db)[:10]
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{plain.layers[k].sqnr_db:.1f}</td>"
                   f"<td>{cwac.layers[k].sqnr_db:.1f}</td></tr>" for k in worst)
    return (f"<h2>Where quantization error is born, and what CWAC removed</h2>{chart}"
            f"<h3>Worst layers (plain PTQ)</h3><table><tr><th>layer</th><th>plain SQNR dB</th>"
            f"<th>CWAC SQNR dB</th></tr>{rows}</table>")


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


def _comparison_html(c: Comparison) -> str:
    status = ("" if not c.verdicts else
              f' <span class="{"pass" if c.passed else "fail"}">{"PASSED" if c.passed else "FAILED"}</span>')
    parts = [f"<h2>{html.escape(c.title)}{status}</h2>",
             f"<p>reference: {html.escape(c.reference)} · candidate: {html.escape(c.candidate)}</p>"]
    parts += [f"<p class=note>{html.escape(n)}</p>" for n in c.notes]
    failed = [v for v in c.verdicts if not v.passed]
    parts += [f'<p class="fail">{html.escape(v.line())}</p>' for v in failed[:20]]
    parts.append("<h3>Outputs</h3>" + _table(c.outputs))
    parts += [_error_histogram(s) for s in c.outputs.values()]
    if c.code_lsb_histogram:
        labels = [str(k) for k in c.code_lsb_histogram]
        parts.append(_svg_bars(f"activation code difference (LSB); at rounding ties: {c.tie_flips}", labels,
                               {"codes": [float(v) for v in c.code_lsb_histogram.values()]},
                               {"codes": PALETTE["bar"]}, "|Δ code|", height=200))
    if c.layers and c.role not in ("plain_vs_float", "cwac_vs_float"):
        worst = dict(sorted(c.layers.items(), key=lambda kv: -kv[1].max_rel))
        parts.append("<h3>Layers (worst first)</h3>" + _table(worst, 25))
    return "<section>" + "".join(parts) + "</section>"


def held_out_account(samples: dict) -> str:
    """One line of ``CwacFit.held_out_samples``: per candidate, the held-out samples it made worse and what
    their rises add up to (the compile's terminal summary and the HTML report both print it)."""
    each = ", ".join(f"{t} {k}" + (f" (adding {samples['added_error'][t]:.1%} of plain's error)"
                                    if k and samples["added_error"][t] is not None else "")
                     for t, k in samples["worse_than_none"].items())
    return f"held-out samples whose output error the candidate raised, of {samples['n']}: {each}"


def gate_html(record: GateRecord | None) -> str:
    """The CWAC output gate's choice: each candidate's held-out output error and the samples it made worse."""
    if record is None:
        return ""
    gate = record.to_dict()
    errs = ", ".join(f"{html.escape(k)} {v:.3g}" for k, v in gate["output_error"].items())
    samples = gate["held_out_samples"]
    worse = f"; {html.escape(held_out_account(samples))}" if samples and samples["worse_than_none"] else ""
    decisions = gate.get("decision_agreement")
    if decisions:
        worse += "; held-out decision agreement with float (softmax argmax): " + \
            ", ".join(f"{html.escape(k)} {v:.4f}" for k, v in decisions.items())
    if gate.get("vetoed"):
        worse += "; not kept, for agreeing with float's decisions less often than no compensation: " + \
            ", ".join(html.escape(t) for t in gate["vetoed"])
    return (f"<section><h2>CWAC output gate</h2><p>kept: <b>{html.escape(gate['target'])}</b> · held-out output "
            f"error (Σ over outputs of MSE / mean(float²)): {errs}{worse}</p></section>")


def render_html(report: CheckReport) -> str:
    verdict = "PASSED" if report.passed else "FAILED"
    failed = [v for v in report.verdicts if not v.passed]
    summary = "".join(f'<p class="fail">{html.escape(v.line())}</p>' for v in failed[:10]) or \
        "".join(f'<p class="pass">{html.escape(v.line())}</p>'
                for v in [v for v in report.verdicts if v.kind == "output"][:5])
    models = "".join(f"<li>{html.escape(k)}: {html.escape(str(v))}</li>" for k, v in report.models.items())
    data = html.escape(json.dumps(report.data.to_dict()))
    body = "".join(_comparison_html(c) for c in report.comparisons)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>qwt2-onnx {html.escape(report.kind)} report: {verdict}</title>
<style>
body {{ font-family: sans-serif; margin: 24px; color: #222; max-width: 1000px; }}
table {{ border-collapse: collapse; font-size: 12px; margin: 8px 0; }}
td, th {{ border: 1px solid #ccc; padding: 3px 6px; text-align: right; }}
td:first-child {{ text-align: left; }}
.pass {{ color: {PALETTE["pass"]}; font-weight: bold; }} .fail {{ color: {PALETTE["fail"]}; font-weight: bold; }}
.note {{ color: #555; font-size: 13px; }} section {{ border-top: 1px solid #ddd; margin-top: 18px; }}
.verdict {{ font-size: 22px; }}
</style></head><body>
<h1>qwt2-onnx {html.escape(report.kind)} report</h1>
<p class="verdict {"pass" if report.passed else "fail"}">{verdict}</p>
{summary}
<ul>{models}</ul><p class=note>data: {data} · created {html.escape(report.created)} · schema {report.schema}</p>
{gate_html(report.cwac_gate)}
{_sqnr_chart(report)}
{body}
</body></html>
"""
