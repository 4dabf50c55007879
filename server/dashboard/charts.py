"""Line charts as inline SVG, drawn on the server: no script, no chart library, nothing fetched."""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

from markupsafe import Markup

MAX_POINTS = 400  # more would only add bytes: the plot is a few hundred pixels wide


def downsample(xs: Sequence[float], ys: Sequence[float], limit: int = MAX_POINTS) -> tuple[list[float], list[float]]:
    """At most `limit` points, evenly spread, always keeping the first and the last."""
    n = len(xs)
    if n <= limit:
        return list(xs), list(ys)
    keep = sorted({round(i * (n - 1) / (limit - 1)) for i in range(limit)})
    return [xs[i] for i in keep], [ys[i] for i in keep]


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering [low, high]."""
    if not math.isfinite(low) or not math.isfinite(high):
        return []
    if high <= low:
        return [low]
    raw = (high - low) / max(1, count - 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step) * step
    ticks = []
    value = first
    while value <= high + step * 1e-9:
        ticks.append(round(value, 10))
        value += step
    return ticks


def _label(value: float) -> str:
    if abs(value) >= 10_000:
        return f"{value / 1000:.4g}k"
    if value != 0 and abs(value) < 0.01:
        return f"{value:.1e}"
    return f"{value:g}" if float(value).is_integer() else f"{value:.3g}"


def line_chart(
    xs: Sequence[float],
    ys: Sequence[float],
    *,
    title: str,
    x_label: str,
    y_label: str,
    width: int = 560,
    height: int = 220,
    css_class: str = "chart",
) -> Markup:
    """One series as an SVG line with a dot per point; text is escaped, numbers are formatted here."""
    pairs = [(x, y) for x, y in zip(xs, ys, strict=True) if math.isfinite(x) and math.isfinite(y)]
    left, right, top, bottom = 56, 12, 26, 38
    inner_w, inner_h = width - left - right, height - top - bottom
    head = (
        f'<svg class="{escape(css_class)}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{escape(title)}" data-points="{len(pairs)}" xmlns="http://www.w3.org/2000/svg">'
        f'<title>{escape(title)}</title><text class="chart-title" x="{left}" y="16">{escape(title)}</text>'
    )
    if not pairs:
        empty = f'<text class="chart-empty" x="{left + inner_w / 2}" y="{top + inner_h / 2}">no points yet</text>'
        return Markup(head + empty + "</svg>")
    px, py = downsample([p[0] for p in pairs], [p[1] for p in pairs])
    x_lo, x_hi = min(px), max(px)
    y_lo, y_hi = min(py), max(py)
    if y_hi == y_lo:
        y_lo, y_hi = y_lo - 0.5, y_hi + 0.5
    if x_hi == x_lo:
        x_hi = x_lo + 1
    y_ticks = nice_ticks(y_lo, y_hi)
    x_ticks = nice_ticks(x_lo, x_hi)
    y_lo, y_hi = min([y_lo, *y_ticks]), max([y_hi, *y_ticks])

    def sx(x: float) -> float:
        return left + (x - x_lo) / (x_hi - x_lo) * inner_w

    def sy(y: float) -> float:
        return top + inner_h - (y - y_lo) / (y_hi - y_lo) * inner_h

    parts = [head, f'<rect class="chart-frame" x="{left}" y="{top}" width="{inner_w}" height="{inner_h}"/>']
    for t in y_ticks:
        y = sy(t)
        parts.append(f'<line class="chart-grid" x1="{left}" x2="{left + inner_w}" y1="{y:.1f}" y2="{y:.1f}"/>')
        parts.append(f'<text class="chart-tick" x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{_label(t)}</text>')
    for t in x_ticks:
        x = sx(t)
        parts.append(
            f'<text class="chart-tick" x="{x:.1f}" y="{top + inner_h + 16}" text-anchor="middle">{_label(t)}</text>'
        )
    parts.append(
        f'<text class="chart-axis" x="{left + inner_w / 2}" y="{height - 4}" text-anchor="middle">'
        f"{escape(x_label)}</text>"
        f'<text class="chart-axis" x="12" y="{top + inner_h / 2}" text-anchor="middle" '
        f'transform="rotate(-90 12 {top + inner_h / 2})">{escape(y_label)}</text>'
    )
    coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in zip(px, py, strict=True))
    parts.append(f'<polyline class="chart-line" points="{coords}"/>')
    if len(px) <= 120:  # dots help to read a short curve and clutter a long one
        parts.extend(
            f'<circle class="chart-dot" cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5"/>'
            for x, y in zip(px, py, strict=True)
        )
    parts.append("</svg>")
    return Markup("".join(parts))
