"""Small self-contained SVG charts (no plotting library, no network): bars, lines, histograms, ranges.

Each function returns the SVG document as a string; :func:`data_uri` embeds it in an ``<img>``.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping, Sequence
from html import escape

WIDTH, HEIGHT = 640, 300  # a chart's usual size; the data area stays HEIGHT - PAD_T - PAD_B high
MAX_WIDTH = 1060  # a chart with many named x positions grows up to this (the report's column is 1100 px)
PAD_L, PAD_R, PAD_T, PAD_B = 60, 16, 28, 42
FONT = 11  # px, the labels' font size
CHAR_WIDTH = 0.6  # an upper estimate of a sans-serif character's mean width, in font sizes
NAME_CHARS = 18  # the longest name written under an x axis; longer ones keep their end after an ellipsis
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf")
SIN45 = math.sqrt(0.5)
NAME_GAP = 16  # px between names rotated by 45 degrees along the x axis: a line's height (11 px) across them


def data_uri(svg: str) -> str:
    return "data:image/svg+xml;base64," + base64.b64encode(svg.encode()).decode()


def text_width(text: str, size: float = FONT) -> float:
    """An upper estimate of the width in pixels of ``text`` set in sans-serif at ``size`` px: an SVG cannot
    measure its text before a browser draws it, so boxes are sized by ``len(text) * size * CHAR_WIDTH``.

    >>> text_width("conv1")
    33.0
    """
    return len(text) * size * CHAR_WIDTH


def shorten(name: str, chars: int = NAME_CHARS) -> str:
    """``name`` when it has at most ``chars`` characters, else an ellipsis and its last ``chars - 1``: the end of
    a layer's path (``/layer1/layer1.0/conv2/Conv``) is what tells it from its neighbours.

    >>> shorten("/layer1/layer1.0/conv2/Conv")
    '…yer1.0/conv2/Conv'
    """
    return name if len(name) <= chars else "\u2026" + name[len(name) - chars + 1 :]


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
    """Axes mapping data to pixels, with grid, ticks and labels.

    The data area (``class="plot"``) is ``left..right`` by ``top..bottom``; under it, in this order, the x tick
    labels (``xnames``: one name per integer x, rotated), the x axis label and the legend (``class="legend"``):
    nothing is drawn over the data, and the image grows downwards to fit what is under it.
    """

    def __init__(self, x0, x1, y0, y1, title, xlabel, ylabel, *, width=WIDTH, ylog=False, xnames=None, legend=(),
                 dashes=None):  # fmt: skip
        if x1 <= x0:
            x1 = x0 + 1
        if ylog:
            y0, y1 = math.log10(max(y0, 1e-12)), math.log10(max(y1, 1e-12))
        if y1 <= y0:
            y1 = y0 + 1
        self.x0, self.x1, self.y0, self.y1, self.ylog = x0, x1, y0, y1, ylog
        self.xnames = list(xnames) if xnames is not None else None
        self.left, self.top, self.bottom = PAD_L, PAD_T, HEIGHT - PAD_B
        if self.xnames:
            # a rotated name hangs down and to the left of its tick: leave room for the first one
            self.left = max(PAD_L, math.ceil(4 + SIN45 * text_width(shorten(self.xnames[0]))))
            width = max(width, min(MAX_WIDTH, self.left + PAD_R + NAME_GAP * len(self.xnames)))
            below = 10 + SIN45 * max(text_width(shorten(n)) for n in self.xnames) + FONT
        else:
            below = 16
        self.w, self.right = width, width - PAD_R
        xlabel_y = self.bottom + below + 12
        rows = self._legend_rows(list(legend))
        self.h = math.ceil(xlabel_y + 6 + (16 * len(rows) + 12 if rows else 0))
        middle = (self.top + self.bottom) / 2
        self.parts = [
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{self.w}" height="{self.h}" '
            f'viewBox="0 0 {self.w} {self.h}" font-family="sans-serif" font-size="{FONT}">',
            f'<rect width="{self.w}" height="{self.h}" fill="white"/>',
            f'<text x="{self.w / 2}" y="16" text-anchor="middle" font-size="13">{escape(title)}</text>',
            f'<text x="{(self.left + self.right) / 2}" y="{xlabel_y:.1f}" text-anchor="middle">{escape(xlabel)}</text>',
            f'<text x="12" y="{middle}" text-anchor="middle" transform="rotate(-90 12 {middle})">'
            f"{escape(ylabel)}</text>",
        ]
        for t in _ticks(y0, y1):
            y = self.py(10**t if ylog else t)
            label = _fmt(10**t) if ylog else _fmt(t)
            self.parts.append(
                f'<line x1="{self.left}" x2="{self.right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>'
                f'<text x="{self.left - 4}" y="{y + 4:.1f}" text-anchor="end">{label}</text>'
            )
        self.parts.append(
            f'<rect class="plot" x="{self.left}" y="{self.top}" width="{self.right - self.left}" '
            f'height="{self.bottom - self.top}" fill="none" stroke="#888"/>'
        )
        if rows:
            self._legend(rows, xlabel_y + 8, dashes or [None] * len(legend))

    def px(self, x: float) -> float:
        return self.left + (x - self.x0) / (self.x1 - self.x0) * (self.right - self.left)

    def py(self, y: float) -> float:
        if self.ylog:
            y = math.log10(max(y, 1e-12))
        y = min(max(y, self.y0), self.y1)
        return self.bottom - (y - self.y0) / (self.y1 - self.y0) * (self.bottom - self.top)

    def xticks(self, ticks=None) -> None:
        if self.xnames is not None:
            self._xnames()
            return
        for t in ticks if ticks is not None else _ticks(self.x0, self.x1, 6):  # 6: the margins widen the range
            x = self.px(t)
            self.parts.append(f'<text x="{x:.1f}" y="{self.bottom + 14}" text-anchor="middle">{_fmt(t)}</text>')

    def _xnames(self) -> None:
        """Each name under its integer x, rotated by 45 degrees; every k-th only where they would overlap (a name
        needs NAME_GAP px along the axis); the full name in its tooltip."""
        step = max(1, math.ceil(NAME_GAP / max(self.px(1) - self.px(0), 1e-9)))
        y = self.bottom + 10
        for i in range(0, len(self.xnames), step):
            x, name = self.px(i), self.xnames[i]
            self.parts.append(
                f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{self.bottom}" y2="{self.bottom + 4}" stroke="#888"/>'
                f'<text class="xname" x="{x:.1f}" y="{y}" text-anchor="end" transform="rotate(-45 {x:.1f} {y})">'
                f"<title>{escape(name)}</title>{escape(shorten(name))}</text>"
            )

    def _legend_rows(self, names: list[str]) -> list[list[tuple[str, float]]]:
        """The legend's entries as rows of (name, x offset), each entry a 16 px swatch, 4 px, its text and 14 px
        to the next, wrapped to the data area's width."""
        rows: list[list[tuple[str, float]]] = []
        x = math.inf
        for name in names:
            need = 20 + text_width(name)
            if x + need > self.right - self.left - 12 and (not rows or rows[-1]):
                rows.append([])
                x = 0.0
            rows[-1].append((name, x))
            x += need + 14
        return rows

    def _legend(self, rows: list[list[tuple[str, float]]], y0: float, dashes: list[str | None]) -> None:
        box_w = 12 + max(x + 20 + text_width(name) for row in rows for name, x in row)
        out = [
            f'<g class="legend"><rect class="box" x="{self.left}" y="{y0:.1f}" width="{box_w:.1f}" '
            f'height="{16 * len(rows) + 6}" fill="white" stroke="#ccc"/>'
        ]
        i = 0
        for r, row in enumerate(rows):
            y = y0 + 15 + 16 * r
            for name, dx in row:
                x, color, dash = self.left + 6 + dx, COLORS[i % len(COLORS)], dashes[i]
                style = f' stroke-dasharray="{dash}"' if dash else ""
                out.append(
                    f'<line x1="{x:.1f}" x2="{x + 16:.1f}" y1="{y - 4:.1f}" y2="{y - 4:.1f}" stroke="{color}" '
                    f'stroke-width="{2 if dash is None else 1.5}"{style}/>'
                    f'<text x="{x + 20:.1f}" y="{y:.1f}">{escape(name)}</text>'
                )
                i += 1
        self.parts.append("".join(out) + "</g>")

    def svg(self) -> str:
        return "".join(self.parts) + "</svg>"


def bars(labels: Sequence[str], values: Sequence[float], title: str, xlabel: str, *, width: int = WIDTH) -> str:
    """Horizontal bars, one row per label, top to bottom (a label longer than 40 characters keeps its end)."""
    n = max(len(labels), 1)
    row = 16
    height = PAD_T + PAD_B + row * n
    shown = [shorten(s, 40) for s in labels]
    left = 8 + math.ceil(max((text_width(s) for s in shown), default=text_width("name")))
    lo = min(0.0, *values) if values else 0.0
    hi = max(0.0, *values) if values else 1.0
    hi = hi if hi > lo else lo + 1
    span = width - left - PAD_R
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'font-family="sans-serif" font-size="{FONT}">',
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
    for i, (label, short, v) in enumerate(zip(labels, shown, values, strict=True)):
        y = PAD_T + i * row
        x0, x1 = sorted((px(0.0), px(v)))
        parts.append(
            f'<rect x="{x0:.1f}" y="{y + 2}" width="{max(x1 - x0, 0.5):.1f}" height="{row - 4}" fill="{COLORS[0]}">'
            f"<title>{escape(label)}: {_fmt(v)}</title></rect>"
            f'<text x="{left - 4}" y="{y + row - 4}" text-anchor="end"><title>{escape(label)}</title>'
            f"{escape(short)}</text>"
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
    xnames: Sequence[str] | None = None,
) -> str:
    """One polyline with markers per series (name -> (xs, ys)); ``hline`` draws a dashed horizontal line.

    With ``xnames`` the xs are positions 0, 1, ... into it, and the x axis shows the names (rotated, shortened by
    :func:`shorten`, each whole in its tooltip) instead of numbers. The legend (two series or more) goes under the
    chart."""
    if xnames is not None:
        x0, x1 = -0.5, len(xnames) - 0.5
    else:
        xs = [x for s in series.values() for x in s[0]]
        x0, x1 = min(xs, default=0), max(xs, default=1)
        margin = (x1 - x0) * 0.02  # markers at the ends sit inside the frame, not on it
        x0, x1 = x0 - margin, x1 + margin
    ys = [y for s in series.values() for y in s[1]] + ([hline] if hline is not None else [])
    ys = [y for y in ys if math.isfinite(y)] or [0.0]
    pad = (max(ys) - min(ys)) * 0.05 or 0.5
    legend = list(series) if len(series) > 1 else []
    f = _Frame(x0, x1, min(ys) - pad, max(ys) + pad, title, xlabel, ylabel, xnames=xnames, legend=legend)
    f.xticks()
    if hline is not None:
        y = f.py(hline)
        f.parts.append(
            f'<line x1="{f.left}" x2="{f.right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#444" stroke-dasharray="5,4"/>'
            f'<text x="{f.left + 4}" y="{y - 4:.1f}">{escape(hline_label)}</text>'
        )
    for i, (name, (sx, sy)) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        kept = [(x, y) for x, y in zip(sx, sy, strict=True) if math.isfinite(y)]
        pts = [(f.px(x), f.py(y)) for x, y in kept]
        if pts:
            f.parts.append(
                f'<polyline fill="none" stroke="{color}" stroke-width="2" points="'
                + " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
                + '"/>'
            )
        for (x, y), (vx, vy) in zip(pts, kept, strict=True):
            where = xnames[int(vx)] if xnames is not None else _fmt(vx)
            f.parts.append(
                f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{color}"><title>{escape(name)}: '
                f"{escape(where)}, {_fmt(vy)}</title></circle>"
            )
    return f.svg()


def histogram(
    edges: Sequence[float], counts: Sequence[float], title: str, *, marks: Mapping[str, tuple[float, float]] = {}
) -> str:
    """A histogram (log count axis) with a pair of vertical lines per mark (name -> (lo, hi)), its legend under
    the chart."""
    lo_edge, hi_edge = edges[0], edges[-1]
    for lo, hi in marks.values():
        lo_edge, hi_edge = min(lo_edge, lo), max(hi_edge, hi)
    margin = (hi_edge - lo_edge) * 0.02  # a mark at the end of the range is drawn inside the frame, not on it
    top = max(max(counts, default=1), 1)
    dashes = [f"{2 + 2 * i},3" for i in range(len(marks))]
    f = _Frame(lo_edge - margin, hi_edge + margin, 0.5, top * 1.5, title, "value", "count", ylog=True,
               legend=list(marks), dashes=dashes)  # fmt: skip
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
                f'<line class="mark" x1="{x:.1f}" x2="{x:.1f}" y1="{f.top}" y2="{f.bottom}" stroke="{color}" '
                f'stroke-width="1.5" stroke-dasharray="{dashes[i]}"><title>{escape(name)}: {_fmt(v)}</title></line>'
            )
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
