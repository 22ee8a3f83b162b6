"""Charts as inline SVG for the HTML report: horizontal bar charts and a scatter plot.

Generated in Python so the page needs no script library, no network and no matplotlib. Every text that
comes from a model (node names are the model author's, so any characters) is escaped. Numbers are written
with fixed precision, so the same figures give the same bytes. Colours come from CSS classes (``CSS``)
that the page includes once.

Each bar is a ``<rect class="bar s0">`` (``s0``, ``s1``: the series) with ``data-value`` holding the figure it
stands for; its length is proportional to it (the tests check that).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape

#: The charts' colours and text, for the page's ``<style>``.
CSS = """
svg.chart { font: 12px system-ui, sans-serif; }
svg.chart text { fill: #222; }
svg.chart .s0 { fill: #9aa5b1; } svg.chart .s1 { fill: #2f6fb5; }
svg.chart .axis { stroke: #555; stroke-width: 1; } svg.chart .grid { stroke: #ddd; stroke-width: 1; }
svg.chart .candidate { fill: #b8b8b8; } svg.chart .front { fill: #2f6fb5; }
svg.chart .front-line { fill: none; stroke: #2f6fb5; stroke-width: 1.5; }
svg.chart .chosen { fill: #d62728; stroke: #7a0000; stroke-width: 1; }
svg.chart .limit { stroke: #d62728; stroke-dasharray: 5 4; stroke-width: 1; }
svg.chart .note { fill: #666; font-style: italic; }
"""

#: Bar chart geometry (px): label column, longest bar, room for the value after it.
_LABEL_W, _BAR_W, _VALUE_W = 300, 460, 110
_BAR_H, _BAR_GAP, _ROW_GAP, _TOP = 11, 2, 7, 28
#: Longest label drawn in full; longer names keep their end (where layer names differ) after an ellipsis.
_LABEL_CHARS = 44


def esc(text: object) -> str:
    """``text`` safe inside HTML/SVG text and attribute values."""
    return escape(str(text), quote=True)


def num(value: float) -> str:
    """A coordinate: two decimals, no ``-0.00``."""
    text = f"{value:.2f}"
    return "0.00" if text == "-0.00" else text


@dataclass(frozen=True)
class BarRow:
    """One row of a bar chart: a label and one value per series (None: the row has no bar in that series)."""

    label: str
    values: tuple[float | None, ...]
    #: Shown instead of a missing bar, e.g. ``removed`` or ``new``.
    missing: tuple[str, ...] = ()


def bar_chart(rows: Sequence[BarRow], series: Sequence[str], fmt: Callable[[float], str], *, title: str) -> str:
    """Horizontal bars, one group per row and one bar per series, all on one scale (the largest value is
    ``_BAR_W`` long). ``fmt`` writes a value for people (after the bar and in its tooltip)."""
    largest = max((v for row in rows for v in row.values if v is not None and math.isfinite(v)), default=0.0)
    scale = _BAR_W / largest if largest > 0 else 0.0
    group_h = len(series) * (_BAR_H + _BAR_GAP) + _ROW_GAP
    height = _TOP + len(rows) * group_h + 4
    width = _LABEL_W + _BAR_W + _VALUE_W
    parts = [f'<svg class="chart bars" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{esc(title)}">']
    parts += _legend(series, _LABEL_W)
    for i, row in enumerate(rows):
        y0 = _TOP + i * group_h
        label = row.label if len(row.label) <= _LABEL_CHARS else "…" + row.label[-(_LABEL_CHARS - 1):]
        parts.append(f'<text class="label" x="{_LABEL_W - 8}" y="{num(y0 + group_h / 2)}" text-anchor="end" '
                     f'dominant-baseline="middle"><title>{esc(row.label)}</title>{esc(label)}</text>')
        for j, name in enumerate(series):
            y = y0 + j * (_BAR_H + _BAR_GAP)
            value = row.values[j] if j < len(row.values) else None
            if value is None or not math.isfinite(value):
                text = row.missing[j] if j < len(row.missing) else ""
                parts.append(f'<text class="note" x="{_LABEL_W + 4}" y="{num(y + _BAR_H - 2)}">{esc(text)}</text>')
                continue
            length = value * scale
            parts.append(f'<rect class="bar s{j}" x="{_LABEL_W}" y="{num(y)}" width="{length:.3f}" height="{_BAR_H}" '
                         f'data-value="{value!r}"><title>{esc(row.label)}: {esc(name)} {esc(fmt(value))}</title></rect>')
            parts.append(f'<text class="value" x="{num(_LABEL_W + length + 4)}" y="{num(y + _BAR_H - 2)}">'
                         f'{esc(fmt(value))}</text>')
    parts.append(f'<line class="axis" x1="{_LABEL_W}" y1="{_TOP - 4}" x2="{_LABEL_W}" y2="{height - 4}"/>')
    parts.append("</svg>")
    return "\n".join(parts)


def _legend(series: Sequence[str], x: float) -> list[str]:
    parts = []
    for j, name in enumerate(series):
        parts.append(f'<rect class="s{j}" x="{num(x)}" y="6" width="12" height="12"/>')
        parts.append(f'<text x="{num(x + 16)}" y="16">{esc(name)}</text>')
        x += 28 + 7 * len(name)
    return parts


@dataclass(frozen=True)
class Point:
    """A point of a scatter plot; ``kind`` is its CSS class (``candidate``, ``front``, ``chosen``)."""

    x: float
    y: float
    kind: str
    title: str


#: Scatter plot geometry (px).
_PLOT_W, _PLOT_H, _LEFT, _RIGHT, _TOP_P, _BOTTOM = 760, 440, 78, 20, 34, 52


def scatter_plot(points: Sequence[Point], *, x_label: str, y_label: str, title: str, log_x: bool = False,
                 line: Sequence[tuple[float, float]] = (), limit: tuple[float, str] | None = None) -> str:
    """Points on linear axes (``log_x``: a logarithmic x axis); ``line``: a polyline drawn as steps (the
    Pareto front); ``limit``: a dashed horizontal line at y with its label (the max drop). Points are drawn
    in the order given, so the chosen one goes last (on top)."""
    xs = [p.x for p in points] + [x for x, _ in line]
    ys = [p.y for p in points] + [y for _, y in line] + ([limit[0]] if limit else [])
    fx = math.log10 if log_x else (lambda v: v)
    x_lo, x_hi = _span([fx(x) for x in xs if x > 0 or not log_x])
    y_lo, y_hi = _span(ys)
    inner_w, inner_h = _PLOT_W - _LEFT - _RIGHT, _PLOT_H - _TOP_P - _BOTTOM

    def px(x: float) -> float:
        return _LEFT + (fx(x) - x_lo) / (x_hi - x_lo) * inner_w

    def py(y: float) -> float:
        return _TOP_P + (y_hi - y) / (y_hi - y_lo) * inner_h

    parts = [f'<svg class="chart scatter" width="{_PLOT_W}" height="{_PLOT_H}" '
             f'viewBox="0 0 {_PLOT_W} {_PLOT_H}" role="img" aria-label="{esc(title)}">',
             f'<text x="{_LEFT}" y="18" font-weight="bold">{esc(title)}</text>']
    for tick in _ticks(y_lo, y_hi):
        parts.append(f'<line class="grid" x1="{_LEFT}" y1="{num(py(tick))}" x2="{_PLOT_W - _RIGHT}" y2="{num(py(tick))}"/>')
        parts.append(f'<text x="{_LEFT - 6}" y="{num(py(tick))}" text-anchor="end" dominant-baseline="middle">'
                     f'{esc(_tick_text(tick))}</text>')
    for value in _x_ticks(x_lo, x_hi, log_x):
        parts.append(f'<line class="grid" x1="{num(px(value))}" y1="{_TOP_P}" x2="{num(px(value))}" y2="{_PLOT_H - _BOTTOM}"/>')
        parts.append(f'<text x="{num(px(value))}" y="{_PLOT_H - _BOTTOM + 16}" text-anchor="middle">'
                     f'{esc(_tick_text(value))}</text>')
    parts.append(f'<line class="axis" x1="{_LEFT}" y1="{_PLOT_H - _BOTTOM}" x2="{_PLOT_W - _RIGHT}" y2="{_PLOT_H - _BOTTOM}"/>')
    parts.append(f'<line class="axis" x1="{_LEFT}" y1="{_TOP_P}" x2="{_LEFT}" y2="{_PLOT_H - _BOTTOM}"/>')
    parts.append(f'<text x="{num(_LEFT + inner_w / 2)}" y="{_PLOT_H - 10}" text-anchor="middle">{esc(x_label)}</text>')
    parts.append(f'<text transform="translate(16 {num(_TOP_P + inner_h / 2)}) rotate(-90)" text-anchor="middle">'
                 f'{esc(y_label)}</text>')
    if limit is not None:
        parts.append(f'<line class="limit" x1="{_LEFT}" y1="{num(py(limit[0]))}" x2="{_PLOT_W - _RIGHT}" '
                     f'y2="{num(py(limit[0]))}"/>')
        parts.append(f'<text x="{_PLOT_W - _RIGHT - 4}" y="{num(py(limit[0]) - 4)}" text-anchor="end">{esc(limit[1])}</text>')
    if line:
        steps = []
        for i, (x, y) in enumerate(line):
            if i:  # steps-post: hold the previous point's y up to this x
                steps.append(f"{num(px(x))},{num(py(line[i - 1][1]))}")
            steps.append(f"{num(px(x))},{num(py(y))}")
        parts.append(f'<polyline class="front-line" points="{" ".join(steps)}"/>')
    for p in points:
        radius = 7 if p.kind == "chosen" else 4 if p.kind == "front" else 3
        parts.append(f'<circle class="point {esc(p.kind)}" cx="{num(px(p.x))}" cy="{num(py(p.y))}" r="{radius}">'
                     f'<title>{esc(p.title)}</title></circle>')
    parts.append("</svg>")
    return "\n".join(parts)


def _span(values: Sequence[float]) -> tuple[float, float]:
    """The axis range: the values' with 5 % room each side (a unit around a single value)."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return 0.0, 1.0
    lo, hi = min(finite), max(finite)
    if hi - lo < 1e-12:
        pad = abs(lo) * 0.1 or 1.0
        return lo - pad, hi + pad
    pad = (hi - lo) * 0.05
    return lo - pad, hi + pad


def _ticks(lo: float, hi: float, wanted: int = 6) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) inside [lo, hi]."""
    raw = (hi - lo) / wanted
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step)
    return [round(k * step, 12) for k in range(first, math.floor(hi / step) + 1)]


def _x_ticks(lo: float, hi: float, log_x: bool) -> list[float]:
    """The x axis's tick values (``lo``, ``hi``: the axis range, in log10 units on a log axis): powers of
    ten on a log axis that spans two of them, else round values."""
    if not log_x:
        return _ticks(lo, hi)
    powers = [10.0 ** k for k in range(math.ceil(lo), math.floor(hi) + 1)]
    return powers if len(powers) >= 2 else [v for v in _ticks(10 ** lo, 10 ** hi) if v > 0]


def _tick_text(value: float) -> str:
    return f"{value:.4g}"
