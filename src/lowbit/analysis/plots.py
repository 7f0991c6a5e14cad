"""Small self-contained SVG charts (no plotting library, no network): bars, lines, histograms, ranges.

Each function returns the SVG document as a string; :func:`data_uri` embeds it in an ``<img>``.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping, Sequence
from html import escape

WIDTH, HEIGHT = 640, 300
PAD_L, PAD_R, PAD_T, PAD_B = 60, 16, 28, 42
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf")


def data_uri(svg: str) -> str:
    return "data:image/svg+xml;base64," + base64.b64encode(svg.encode()).decode()


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        return f"{v:.1e}"
    return f"{v:.4g}"


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    for m in (1, 2, 5, 10):
        if (hi - lo) / (step * m) <= n:
            step *= m
            break
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


class _Frame:
    """Axes mapping data to pixels, with grid, ticks and labels."""

    def __init__(self, x0, x1, y0, y1, title, xlabel, ylabel, width=WIDTH, height=HEIGHT, ylog=False):
        if x1 <= x0:
            x1 = x0 + 1
        if ylog:
            y0, y1 = math.log10(max(y0, 1e-12)), math.log10(max(y1, 1e-12))
        if y1 <= y0:
            y1 = y0 + 1
        self.x0, self.x1, self.y0, self.y1, self.ylog = x0, x1, y0, y1, ylog
        self.w, self.h = width, height
        self.parts = [
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
            f'<rect width="{width}" height="{height}" fill="white"/>',
            f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="13">{escape(title)}</text>',
            f'<text x="{width / 2}" y="{height - 6}" text-anchor="middle">{escape(xlabel)}</text>',
            f'<text x="12" y="{height / 2}" text-anchor="middle" transform="rotate(-90 12 {height / 2})">'
            f"{escape(ylabel)}</text>",
        ]
        for t in _ticks(y0, y1):
            y = self.py(10**t if ylog else t)
            label = _fmt(10**t) if ylog else _fmt(t)
            self.parts.append(
                f'<line x1="{PAD_L}" x2="{width - PAD_R}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>'
                f'<text x="{PAD_L - 4}" y="{y + 4:.1f}" text-anchor="end">{label}</text>'
            )
        self.parts.append(
            f'<rect x="{PAD_L}" y="{PAD_T}" width="{width - PAD_L - PAD_R}" height="{height - PAD_T - PAD_B}" '
            'fill="none" stroke="#888"/>'
        )

    def px(self, x: float) -> float:
        return PAD_L + (x - self.x0) / (self.x1 - self.x0) * (self.w - PAD_L - PAD_R)

    def py(self, y: float) -> float:
        if self.ylog:
            y = math.log10(max(y, 1e-12))
        y = min(max(y, self.y0), self.y1)
        return self.h - PAD_B - (y - self.y0) / (self.y1 - self.y0) * (self.h - PAD_T - PAD_B)

    def xticks(self, ticks=None) -> None:
        for t in ticks if ticks is not None else _ticks(self.x0, self.x1):
            x = self.px(t)
            self.parts.append(f'<text x="{x:.1f}" y="{self.h - PAD_B + 14}" text-anchor="middle">{_fmt(t)}</text>')

    def legend(self, names: Sequence[str]) -> None:
        if names:  # a white backing, so that lines under the legend do not run through its text
            self.parts.append(
                f'<rect x="{self.w - PAD_R - 156}" y="{PAD_T + 2}" width="152" height="{14 * len(names) + 6}" '
                'fill="white" fill-opacity="0.85" stroke="#ccc"/>'
            )
        for i, name in enumerate(names):
            y = PAD_T + 12 + 14 * i
            color = COLORS[i % len(COLORS)]
            self.parts.append(
                f'<rect x="{self.w - PAD_R - 150}" y="{y - 8}" width="10" height="10" fill="{color}"/>'
                f'<text x="{self.w - PAD_R - 136}" y="{y + 1}">{escape(name)}</text>'
            )

    def svg(self) -> str:
        return "".join(self.parts) + "</svg>"


def bars(labels: Sequence[str], values: Sequence[float], title: str, xlabel: str, *, width: int = WIDTH) -> str:
    """Horizontal bars, one row per label, top to bottom."""
    n = max(len(labels), 1)
    row = 16
    height = PAD_T + PAD_B + row * n
    left = min(260, 8 + 6 * max((len(s) for s in labels), default=4))
    lo = min(0.0, *values) if values else 0.0
    hi = max(0.0, *values) if values else 1.0
    hi = hi if hi > lo else lo + 1
    span = width - left - PAD_R
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        'font-family="sans-serif" font-size="11">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="13">{escape(title)}</text>',
        f'<text x="{left + span / 2}" y="{height - 6}" text-anchor="middle">{escape(xlabel)}</text>',
    ]

    def px(v):
        return left + (v - lo) / (hi - lo) * span

    for t in _ticks(lo, hi):
        parts.append(
            f'<line x1="{px(t):.1f}" x2="{px(t):.1f}" y1="{PAD_T}" y2="{height - PAD_B}" stroke="#ddd"/>'
            f'<text x="{px(t):.1f}" y="{height - PAD_B + 14}" text-anchor="middle">{_fmt(t)}</text>'
        )
    for i, (label, v) in enumerate(zip(labels, values, strict=True)):
        y = PAD_T + i * row
        x0, x1 = sorted((px(0.0), px(v)))
        parts.append(
            f'<rect x="{x0:.1f}" y="{y + 2}" width="{max(x1 - x0, 0.5):.1f}" height="{row - 4}" fill="{COLORS[0]}">'
            f"<title>{escape(label)}: {_fmt(v)}</title></rect>"
            f'<text x="{left - 4}" y="{y + row - 4}" text-anchor="end">{escape(label[-40:])}</text>'
        )
    return "".join(parts) + "</svg>"


def lines(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    title: str,
    xlabel: str,
    ylabel: str,
    *,
    hline: float | None = None,
    hline_label: str = "",
) -> str:
    """One polyline with markers per series (name -> (xs, ys)); ``hline`` draws a dashed horizontal line."""
    xs = [x for s in series.values() for x in s[0]]
    ys = [y for s in series.values() for y in s[1]] + ([hline] if hline is not None else [])
    ys = [y for y in ys if math.isfinite(y)] or [0.0]
    pad = (max(ys) - min(ys)) * 0.05 or 0.5
    f = _Frame(min(xs, default=0), max(xs, default=1), min(ys) - pad, max(ys) + pad, title, xlabel, ylabel)
    f.xticks()
    if hline is not None:
        y = f.py(hline)
        f.parts.append(
            f'<line x1="{PAD_L}" x2="{f.w - PAD_R}" y1="{y:.1f}" y2="{y:.1f}" stroke="#444" stroke-dasharray="5,4"/>'
            f'<text x="{PAD_L + 4}" y="{y - 4:.1f}">{escape(hline_label)}</text>'
        )
    for i, (name, (sx, sy)) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        pts = [(f.px(x), f.py(y)) for x, y in zip(sx, sy, strict=True) if math.isfinite(y)]
        if pts:
            f.parts.append(
                f'<polyline fill="none" stroke="{color}" stroke-width="2" points="'
                + " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
                + '"/>'
            )
        for (x, y), vx, vy in zip(pts, sx, sy, strict=False):
            f.parts.append(
                f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{color}"><title>{escape(name)}: '
                f"{_fmt(vx)}, {_fmt(vy)}</title></circle>"
            )
    if len(series) > 1:
        f.legend(list(series))
    return f.svg()


def histogram(
    edges: Sequence[float], counts: Sequence[float], title: str, *, marks: Mapping[str, tuple[float, float]] = {}
) -> str:
    """A histogram (log count axis) with a pair of vertical lines per mark (name -> (lo, hi))."""
    lo_edge, hi_edge = edges[0], edges[-1]
    for lo, hi in marks.values():
        lo_edge, hi_edge = min(lo_edge, lo), max(hi_edge, hi)
    top = max(max(counts, default=1), 1)
    f = _Frame(lo_edge, hi_edge, 0.5, top * 1.5, title, "value", "count", ylog=True)
    f.xticks()
    base = f.py(0.5)
    for c, a, b in zip(counts, edges[:-1], edges[1:], strict=True):
        if c > 0:
            y = f.py(c)
            f.parts.append(
                f'<rect x="{f.px(a):.1f}" y="{y:.1f}" width="{max(f.px(b) - f.px(a), 0.5):.1f}" '
                f'height="{base - y:.1f}" fill="#9ab"/>'
            )
    for i, (name, (lo, hi)) in enumerate(marks.items()):
        color = COLORS[i % len(COLORS)]
        for v in (lo, hi):
            x = f.px(v)
            f.parts.append(
                f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{PAD_T}" y2="{f.h - PAD_B}" stroke="{color}" '
                f'stroke-width="1.5" stroke-dasharray="{2 + 2 * i},3"><title>{escape(name)}: {_fmt(v)}</title></line>'
            )
    f.legend(list(marks))
    return f.svg()


def ranges(mins: Sequence[float], maxs: Sequence[float], title: str) -> str:
    """Per-channel [min, max] as vertical bars, channel index on x."""
    n = len(mins)
    lo, hi = min(mins, default=0.0), max(maxs, default=1.0)
    pad = (hi - lo) * 0.05 or 0.5
    f = _Frame(-0.5, n - 0.5, min(lo, 0) - pad, max(hi, 0) + pad, title, "output channel", "weight value")
    f.xticks([t for t in _ticks(0, max(n - 1, 1)) if t <= n - 1])
    width = max((f.px(1) - f.px(0)) * 0.7, 0.8)
    for i, (a, b) in enumerate(zip(mins, maxs, strict=True)):
        x = f.px(i) - width / 2
        f.parts.append(
            f'<rect x="{x:.1f}" y="{f.py(b):.1f}" width="{width:.1f}" height="{max(f.py(a) - f.py(b), 0.5):.1f}" '
            f'fill="{COLORS[0]}"><title>channel {i}: [{_fmt(a)}, {_fmt(b)}]</title></rect>'
        )
    return f.svg()
