"""Inline SVG charts for the report: line charts and expert-load heatmaps, no library, no script.

Every series is cut to at most :data:`MAX_POINTS` points before it is drawn (each bucket of
steps keeps its lowest and highest value, so a loss spike survives), so a chart's size does not
grow with the run: a 100,000-step run draws as many points as a 1,000-step one.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence
from html import escape

MAX_POINTS = 400
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f",
           "#bcbd22")
Point = tuple[float, float]


def downsample(points: Sequence[Point], limit: int = MAX_POINTS) -> list[Point]:
    """At most ``limit`` points: the first and last, and each bucket's lowest and highest."""
    if len(points) <= limit:
        return list(points)
    buckets = max(1, (limit - 2) // 2)
    inner = points[1:-1]
    size = len(inner) / buckets
    out = [points[0]]
    for b in range(buckets):
        chunk = inner[int(b * size) : int((b + 1) * size)]
        if not chunk:
            continue
        low = min(chunk, key=lambda p: p[1])
        high = max(chunk, key=lambda p: p[1])
        out += sorted({low, high}, key=lambda p: p[0])
    out.append(points[-1])
    return out


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering [low, high]."""
    if not math.isfinite(low) or not math.isfinite(high):
        return []
    if high <= low:
        high = low + (abs(low) or 1.0)
    raw = (high - low) / max(count, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.floor(low / step) * step
    ticks = []
    value = first
    while value <= high + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    return ticks


def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1e4 or abs(value) < 1e-3:
        return f"{value:.1e}"
    return f"{value:.4g}"


def line_chart(series: Sequence[tuple[str, Sequence[Point]]], *, title: str, y_label: str = "",
               width: int = 560, height: int = 240, markers: Sequence[str] = (), chart_id: str | None = None) -> str:
    """An SVG line chart of named ``(step, value)`` series; ``markers``: series drawn with dots."""
    drawn = [(name, downsample([p for p in pts if math.isfinite(p[1])])) for name, pts in series]
    drawn = [(name, pts) for name, pts in drawn if pts]
    ident = f' id="{escape(chart_id)}"' if chart_id else ""
    head = (f'<svg{ident} class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
            f'width="{width}" height="{height}" role="img" aria-label="{escape(title)}">')
    if not drawn:
        return (head + f'<text x="10" y="20" class="ct">{escape(title)}</text>'
                f'<text x="10" y="50" class="cn">nothing logged</text></svg>')
    left, right, top, bottom = 58, 16, 40, 34
    xs = [p[0] for _, pts in drawn for p in pts]
    ys = [p[1] for _, pts in drawn for p in pts]
    x_ticks = nice_ticks(min(xs), max(xs))
    y_ticks = nice_ticks(min(ys), max(ys))
    x0, x1 = min(x_ticks[0], min(xs)), max(x_ticks[-1], max(xs))
    y0, y1 = min(y_ticks[0], min(ys)), max(y_ticks[-1], max(ys))
    plot_w, plot_h = width - left - right, height - top - bottom

    def sx(x: float) -> float:
        return left + (x - x0) / ((x1 - x0) or 1) * plot_w

    def sy(y: float) -> float:
        return top + plot_h - (y - y0) / ((y1 - y0) or 1) * plot_h

    parts = [head, f'<text x="{left}" y="16" class="ct">{escape(title)}</text>']
    for t in y_ticks:
        y = sy(t)
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                     f'<text x="{left - 6}" y="{y + 4:.1f}" class="tk" text-anchor="end">{_fmt(t)}</text>')
    for t in x_ticks:
        x = sx(t)
        parts.append(f'<text x="{x:.1f}" y="{height - bottom + 16}" class="tk" text-anchor="middle">{_fmt(t)}</text>')
    parts.append(f'<text x="{left + plot_w / 2:.1f}" y="{height - 4}" class="tk" text-anchor="middle">step</text>')
    if y_label:
        parts.append(f'<text x="12" y="{top + plot_h / 2:.1f}" class="tk" text-anchor="middle" '
                     f'transform="rotate(-90 12 {top + plot_h / 2:.1f})">{escape(y_label)}</text>')
    parts.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" class="frame"/>')
    legend_x = left
    for i, (name, pts) in enumerate(drawn):
        colour = PALETTE[i % len(PALETTE)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1.5">'
                     f'<title>{escape(name)}: {_fmt(pts[0][1])} (step {_fmt(pts[0][0])}) -&gt; '
                     f'{_fmt(pts[-1][1])} (step {_fmt(pts[-1][0])})</title></polyline>')
        if name in markers:
            parts += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{colour}"><title>step {_fmt(x)}: '
                      f'{_fmt(y)}</title></circle>' for x, y in pts]
        parts.append(f'<rect x="{legend_x}" y="{top - 16}" width="10" height="10" fill="{colour}"/>'
                     f'<text x="{legend_x + 14}" y="{top - 7}" class="lg">{escape(name)}</text>')
        legend_x += 24 + 7 * len(name)
    parts.append("</svg>")
    return "".join(parts)


def heatmap(rows: Sequence[str], steps: Sequence[float], values: Sequence[Sequence[float]], *, title: str,
            width: int = 470, row_height: int = 14, max_columns: int = 160) -> str:
    """An SVG heatmap: one row per name (an expert), one column per step, darker = larger.
    The cells are one small PNG (a pixel each) scaled up inside the SVG, so a long run stays
    a few kilobytes; columns beyond ``max_columns`` are averaged together."""
    from PIL import Image

    columns = len(steps)
    if not rows or not columns:
        return f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} 40" width="{width}" ' \
               f'height="40"><text x="10" y="20" class="ct">{escape(title)}: nothing logged</text></svg>'
    groups = [list(range(int(c * columns / max_columns), max(int((c + 1) * columns / max_columns),
                                                              int(c * columns / max_columns) + 1)))
              for c in range(min(columns, max_columns))]
    cells = [[sum(row[i] for i in g) / len(g) for g in groups] for row in values]
    top_value = max((v for row in cells for v in row), default=0) or 1.0
    image = Image.new("RGB", (len(groups), len(rows)))
    for r, row in enumerate(cells):
        for c, v in enumerate(row):
            shade = int(255 - 215 * min(v / top_value, 1.0))
            image.putpixel((c, r), (shade, shade, 255))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    left, top = 70, 22
    plot_w, plot_h = width - left - 24, row_height * len(rows)
    height = top + plot_h + 30
    parts = [f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
             f'height="{height}" role="img" aria-label="{escape(title)}">',
             f'<text x="{left}" y="14" class="ct">{escape(title)} (darkest: {top_value:.0%} of the tokens)</text>',
             f'<image x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" preserveAspectRatio="none" '
             f'style="image-rendering:pixelated" href="data:image/png;base64,{data}"/>',
             f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" class="frame"/>']
    for r, name in enumerate(rows):
        parts.append(f'<text x="{left - 6}" y="{top + r * row_height + row_height * 0.75:.1f}" class="tk" '
                     f'text-anchor="end">{escape(name)}</text>')
    for label, x in ((steps[0], left), (steps[-1], left + plot_w)):
        parts.append(f'<text x="{x}" y="{top + plot_h + 14}" class="tk" text-anchor="middle">{_fmt(label)}</text>')
    parts.append(f'<text x="{left + plot_w / 2:.1f}" y="{top + plot_h + 26}" class="tk" text-anchor="middle">step</text>')
    parts.append("</svg>")
    return "".join(parts)
