"""A minimal SVG line/scatter chart (no plotting dependency) for docs/BENCHMARKS.md."""
from __future__ import annotations

import math
from html import escape

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]


def line_plot(series: dict[str, list[tuple[float, float]]], xlabel: str, ylabel: str, title: str,
              logx: bool = False, labels: list[tuple[float, float, str]] = (), w: int = 640, h: int = 340,
              lines: bool = True) -> str:
    """One polyline (``lines``) with markers per series; ``labels``: (x, y, text) annotations."""
    pts = [p for s in series.values() for p in s]
    if not pts:
        return f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="40"><text y="20">no data</text></svg>'
    tx = (lambda x: math.log10(x)) if logx else (lambda x: x)
    xs, ys = [tx(x) for x, _ in pts], [y for _, y in pts]
    x0, x1 = min(xs), max(xs)
    x0, x1 = (x0 - 0.5, x1 + 0.5) if x1 == x0 else (x0 - 0.05 * (x1 - x0), x1 + 0.05 * (x1 - x0))
    y0, y1 = 0.0, max(ys) * 1.1 or 1.0
    L, R, T, B = 70, 250, 30, 50
    px = lambda x: L + (tx(x) - x0) / (x1 - x0) * (w - L - R)  # noqa: E731
    py = lambda y: h - B - (y - y0) / (y1 - y0) * (h - T - B)  # noqa: E731
    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">',
         f'<rect width="{w}" height="{h}" fill="white"/>',
         f'<text x="{w / 2}" y="18" text-anchor="middle" font-size="13">{escape(title)}</text>',
         f'<line x1="{L}" y1="{h - B}" x2="{w - R}" y2="{h - B}" stroke="black"/>',
         f'<line x1="{L}" y1="{T}" x2="{L}" y2="{h - B}" stroke="black"/>',
         f'<text x="{(L + w - R) / 2}" y="{h - 12}" text-anchor="middle">{escape(xlabel)}</text>',
         f'<text x="16" y="{(T + h - B) / 2}" text-anchor="middle" '
         f'transform="rotate(-90 16 {(T + h - B) / 2})">{escape(ylabel)}</text>']
    xt = sorted({x for x, _ in pts}) if logx else [x0 + i * (x1 - x0) / 4 for i in range(5)]
    for x in xt:
        xv = x if logx else x
        X = px(xv) if logx else L + (x - x0) / (x1 - x0) * (w - L - R)
        o.append(f'<text x="{X:.1f}" y="{h - B + 15}" text-anchor="middle">{x:g}</text>' if logx else
                 f'<text x="{X:.1f}" y="{h - B + 15}" text-anchor="middle">{x:.2f}</text>')
    for i in range(5):
        y = y0 + i * (y1 - y0) / 4
        o.append(f'<text x="{L - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{y:.0f}</text>')
        o.append(f'<line x1="{L}" y1="{py(y):.1f}" x2="{w - R}" y2="{py(y):.1f}" stroke="#ddd"/>')
    for i, (name, s) in enumerate(series.items()):
        c = COLORS[i % len(COLORS)]
        s = sorted(s)
        if lines:
            o.append(f'<polyline fill="none" stroke="{c}" stroke-width="1.5" points="'
                     + " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in s) + '"/>')
        o += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{c}"/>' for x, y in s]
        o.append(f'<rect x="{w - R + 10}" y="{T + 16 * i}" width="10" height="10" fill="{c}"/>')
        o.append(f'<text x="{w - R + 24}" y="{T + 16 * i + 9}">{escape(name[:42])}</text>')
    o += [f'<text x="{px(x) + 4:.1f}" y="{py(y) - 5:.1f}" fill="#555">{escape(t)}</text>' for x, y, t in labels]
    return "\n".join(o + ["</svg>"]) + "\n"
