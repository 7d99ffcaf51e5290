"""Inline SVG charts for the run report: lines over steps, grouped bars with intervals, a histogram.

Each chart is drawn in a fixed coordinate box (`viewBox`) and scales with the page's width, so it stays legible on
a phone; colours come from the page's CSS classes (`s0`..`s5`), text is HTML-escaped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

from medtune.report.html import Raw

WIDTH, HEIGHT = 520, 250
LEFT, RIGHT, TOP, BOTTOM = 70, 22, 14, 40  # margins: tick labels on the left and below, the legend under the title
SERIES = 6  # distinct colour classes s0..s5 in the page's style


@dataclass(frozen=True)
class Series:
    label: str
    points: Sequence[tuple[float, float]]
    dots: bool = False  # markers for sparse series (validation loss every N steps)


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering [low, high]."""
    if high <= low:
        high = low + 1.0
    raw = (high - low) / count
    step = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 2.5, 5, 10):
        if raw <= factor * step:
            step *= factor
            break
    first = math.floor(low / step) * step
    return [first + i * step for i in range(int(math.ceil((high - first) / step)) + 1)]


def _label(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1e5 or abs(value) < 1e-2:  # short on a phone: 1.5e-3, not 0.0015 or 1.5e-03
        mantissa, exponent = f"{value:.1e}".split("e")
        return f"{mantissa.removesuffix('.0')}e{int(exponent)}"
    return f"{value:.4g}"


class Frame:
    """Maps data coordinates into the drawing box and draws the axes."""

    def __init__(self, xs: Sequence[float], ys: Sequence[float], y_range: tuple[float, float] | None = None) -> None:
        self.x_ticks = _ticks(min(xs), max(xs)) if xs else [0.0, 1.0]
        low, high = y_range or (min(ys), max(ys))
        self.y_ticks = _ticks(low, high)
        self.x0, self.x1 = min(self.x_ticks[0], min(xs, default=0)), max(self.x_ticks[-1], max(xs, default=1))
        self.y0, self.y1 = (y_range if y_range is not None else (self.y_ticks[0], self.y_ticks[-1]))
        self.y_ticks = [t for t in self.y_ticks if self.y0 - 1e-12 <= t <= self.y1 + 1e-12]

    def x(self, value: float) -> float:
        span = (self.x1 - self.x0) or 1.0
        return LEFT + (value - self.x0) / span * (WIDTH - LEFT - RIGHT)

    def y(self, value: float) -> float:
        span = (self.y1 - self.y0) or 1.0
        return HEIGHT - BOTTOM - (value - self.y0) / span * (HEIGHT - TOP - BOTTOM)

    def axes(self, x_title: str, y_title: str, x_labels: bool = True) -> list[str]:
        out = []
        for t in self.y_ticks:
            out.append(f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{self.y(t):.1f}" '
                       f'y2="{self.y(t):.1f}"/>'
                       f'<text class="tick" x="{LEFT - 6}" y="{self.y(t) + 4:.1f}" text-anchor="end">'
                       f"{_label(t)}</text>")
        if x_labels:
            for t in self.x_ticks:
                if self.x0 <= t <= self.x1:
                    out.append(f'<text class="tick" x="{self.x(t):.1f}" y="{HEIGHT - BOTTOM + 16}" '
                               f'text-anchor="middle">{_label(t)}</text>')
        out.append(f'<line class="axis" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{HEIGHT - BOTTOM}" '
                   f'y2="{HEIGHT - BOTTOM}"/>')
        out.append(f'<text class="title" x="{(LEFT + WIDTH - RIGHT) / 2}" y="{HEIGHT - 4}" text-anchor="middle">'
                   f"{escape(x_title)}</text>")
        out.append(f'<text class="title" transform="translate(12 {(TOP + HEIGHT - BOTTOM) / 2}) rotate(-90)" '
                   f'text-anchor="middle">{escape(y_title)}</text>')
        return out


def _svg(title: str, body: list[str], legend: list[tuple[str, str]]) -> Raw:
    keys = "".join(f'<span class="key"><i class="{cls}"></i>{escape(label)}</span>' for label, cls in legend)
    return Raw(f'<figure class="chart"><figcaption>{escape(title)}</figcaption>'
               f'<svg viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(title)}" '
               f'xmlns="http://www.w3.org/2000/svg">{"".join(body)}</svg>'
               + (f'<div class="legend">{keys}</div>' if len(legend) > 1 else "") + "</figure>")


def lines(title: str, series: Sequence[Series], x_title: str, y_title: str,
          y_range: tuple[float, float] | None = None) -> Raw | None:
    """One line per series over a shared x axis; None when there is nothing to draw."""
    drawn = [s for s in series if s.points]
    if not drawn:
        return None
    xs = [x for s in drawn for x, _ in s.points]
    ys = [y for s in drawn for _, y in s.points]
    frame = Frame(xs, ys, y_range)
    body = frame.axes(x_title, y_title)
    legend = []
    for i, s in enumerate(drawn):
        cls = f"s{i % SERIES}"
        path = " ".join(f"{'M' if j == 0 else 'L'}{frame.x(x):.1f},{frame.y(y):.1f}"
                        for j, (x, y) in enumerate(s.points))
        body.append(f'<path class="line {cls}" d="{path}"><title>{escape(s.label)}</title></path>')
        if s.dots or len(s.points) == 1:
            body += [f'<circle class="dot {cls}" cx="{frame.x(x):.1f}" cy="{frame.y(y):.1f}" r="3.5">'
                     f"<title>{escape(s.label)}: step {_label(x)}, {_label(y)}</title></circle>" for x, y in s.points]
        legend.append((s.label, cls))
    return _svg(title, body, legend)


def histogram(title: str, edges: Sequence[float], counts: Sequence[int], x_title: str, y_title: str,
              marker: tuple[float, str] | None = None) -> Raw | None:
    """Bars between consecutive `edges`; `marker` draws a dashed vertical line (value, label), e.g. the length cap."""
    if not counts:
        return None
    frame = Frame([edges[0], edges[-1]], [0, max(counts)], (0, max(max(counts), 1) * 1.08))
    body = frame.axes(x_title, y_title)
    for low, high, count in zip(edges, edges[1:], counts):
        x0, x1 = frame.x(low), frame.x(high)
        body.append(f'<rect class="bar s0" x="{x0 + 0.5:.1f}" y="{frame.y(count):.1f}" '
                    f'width="{max(0.5, x1 - x0 - 1):.1f}" '
                    f'height="{frame.y(0) - frame.y(count):.1f}"><title>{_label(low)}–{_label(high)}: {count}</title>'
                    "</rect>")
    if marker is not None:
        x = frame.x(marker[0])
        body.append(f'<line class="marker" x1="{x:.1f}" x2="{x:.1f}" y1="{TOP}" y2="{HEIGHT - BOTTOM}"/>'
                    f'<text class="tick" x="{x - 4:.1f}" y="{TOP + 10}" text-anchor="end">{escape(marker[1])}</text>')
    return _svg(title, body, [])


@dataclass(frozen=True)
class Bar:
    group: str
    label: str  # the series (model) inside the group
    value: float
    low: float | None = None
    high: float | None = None


def grouped_bars(title: str, bars: Sequence[Bar], y_title: str, baselines: dict[str, float] | None = None,
                 baseline_label: str = "") -> Raw | None:
    """Bars per group (benchmark) and series (model) with interval whiskers, on a 0–1 axis; `baselines` draws a
    dashed line across each group (the constant-answer accuracy)."""
    if not bars:
        return None
    groups = list(dict.fromkeys(b.group for b in bars))
    labels = list(dict.fromkeys(b.label for b in bars))
    frame = Frame([0, len(groups)], [0, 1], (0, 1))
    body = frame.axes("", y_title, x_labels=False)
    slot = (WIDTH - LEFT - RIGHT) / len(groups)
    width = slot * 0.8 / len(labels)
    for g, group in enumerate(groups):
        left = LEFT + g * slot + slot * 0.1
        body.append(f'<text class="tick" x="{LEFT + (g + 0.5) * slot:.1f}" y="{HEIGHT - BOTTOM + 16}" '
                    f'text-anchor="middle">{escape(group)}</text>')
        for bar in (b for b in bars if b.group == group):
            i = labels.index(bar.label)
            x = left + i * width
            body.append(f'<rect class="bar s{i % SERIES}" x="{x + 1:.1f}" y="{frame.y(bar.value):.1f}" '
                        f'width="{width - 2:.1f}" height="{frame.y(0) - frame.y(bar.value):.1f}">'
                        f"<title>{escape(bar.label)} on {escape(group)}: {bar.value:.1%}</title></rect>")
            if bar.low is not None and bar.high is not None:
                mid = x + width / 2
                body.append(f'<path class="whisker" d="M{mid:.1f},{frame.y(bar.low):.1f} V{frame.y(bar.high):.1f} '
                            f'M{mid - 4:.1f},{frame.y(bar.low):.1f} h8 M{mid - 4:.1f},{frame.y(bar.high):.1f} h8"/>')
        if baselines and group in baselines:
            y = frame.y(baselines[group])
            body.append(f'<line class="marker" x1="{left:.1f}" x2="{left + slot * 0.8:.1f}" y1="{y:.1f}" '
                        f'y2="{y:.1f}"><title>{escape(baseline_label)}: {baselines[group]:.1%}</title></line>')
    legend = [(label, f"s{i % SERIES}") for i, label in enumerate(labels)]
    if baselines:
        legend.append((baseline_label, "baseline"))
    return _svg(title, body, legend if len(legend) > 1 else [])
