"""Chart geometry for the report: loss-curve SVG coordinates (heatmaps are drawn by report.js from
`reports.aggregates`, since their axes are chosen in the page).

The templates only loop over what these functions prepare; no maths in Jinja.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

SERIES_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd",
                 "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22")
MAX_POINTS = 600


def fmt(value: Any) -> str:
    """Human-readable number or text; None becomes an em dash."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "NaN" if math.isnan(value) else f"{value:.4g}"
    return str(value)


@dataclass(frozen=True)
class Tick:
    pos: str
    label: str


@dataclass(frozen=True)
class LossSeries:
    label: str
    color: str
    raw: str
    smooth: str
    final: str
    validation: str = ""  # polyline of the held-out validation loss at each checkpoint, if measured
    validation_dots: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class LossChart:
    width: int
    height: int
    left: int
    top: int
    right: int
    bottom: int
    x_ticks: list[Tick]
    y_ticks: list[Tick]
    series: list[LossSeries]

    @property
    def plot_width(self) -> int:
        return self.right - self.left

    @property
    def plot_height(self) -> int:
        return self.bottom - self.top

    @property
    def mid_x(self) -> float:
        return (self.left + self.right) / 2

    @property
    def mid_y(self) -> float:
        return (self.top + self.bottom) / 2

    @property
    def x_tick_y(self) -> int:
        return self.bottom + 16

    @property
    def y_tick_x(self) -> int:
        return self.left - 6


def smooth(values: Sequence[float]) -> list[float]:
    """Debiased exponential moving average with a window of about a tenth of the series."""
    weight = min(0.98, 1.0 - 1.0 / max(1.0, len(values) / 10))
    out, avg = [], 0.0
    for i, value in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * value
        out.append(avg / (1 - weight**i) if weight > 0 else value)
    return out


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering [low, high] (1, 2, 5 x 10^k steps)."""
    if high <= low:
        return [low]
    raw = (high - low) / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def thin(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """At most MAX_POINTS evenly spaced points, always keeping the last one."""
    if len(points) <= MAX_POINTS:
        return list(points)
    stride = math.ceil(len(points) / MAX_POINTS)
    return list(points[::stride]) + [points[-1]]


def y_range(series: dict[str, list[tuple[int, float]]]) -> tuple[float, float]:
    """Loss range covering the smoothed curves and the 2nd-98th percentile of raw values."""
    raw = sorted(loss for points in series.values() for _, loss in points)
    smoothed = [v for points in series.values() for v in smooth([loss for _, loss in points])]
    lo = min(raw[int(0.02 * (len(raw) - 1))], min(smoothed))
    hi = max(raw[int(0.98 * (len(raw) - 1))], max(smoothed))
    pad = (hi - lo) * 0.05 or abs(hi) * 0.05 or 1.0
    return lo - pad, hi + pad


def loss_chart(series: dict[str, list[tuple[int, float]]], labels: dict[str, str],
               width: int = 900, height: int = 360,
               validation: dict[str, list[tuple[int, float]]] | None = None) -> LossChart | None:
    """Raw and smoothed loss polylines, one colour per run, plus each run's validation loss at its
    checkpoints where measured; None when no run logged a loss."""
    series = {run: points for run, points in series.items() if points}
    if not series:
        return None
    validation = {run: points for run, points in (validation or {}).items() if points and run in series}
    left, top, right, bottom = 64, 16, width - 16, height - 40
    x_max = max(step for points in series.values() for step, _ in points) or 1
    y_lo, y_hi = y_range(series)
    held_out = [v for points in validation.values() for _, v in points]
    if held_out:
        pad = (max(held_out) - min(held_out)) * 0.05 or abs(max(held_out)) * 0.05 or 1.0
        y_lo, y_hi = min(y_lo, min(held_out) - pad), max(y_hi, max(held_out) + pad)

    def px(step: float) -> float:
        return left + (right - left) * step / x_max

    def py(loss: float) -> float:
        return bottom - (bottom - top) * (loss - y_lo) / (y_hi - y_lo)

    def polyline(points: Sequence[tuple[float, float]]) -> str:
        return " ".join(f"{px(s):.1f},{py(v):.1f}" for s, v in thin(points))

    drawn = []
    for i, (run, points) in enumerate(sorted(series.items(), key=lambda kv: labels.get(kv[0], kv[0]))):
        smoothed = smooth([loss for _, loss in points])
        held = validation.get(run, [])
        drawn.append(LossSeries(labels.get(run, run), SERIES_COLORS[i % len(SERIES_COLORS)],
                                polyline(points), polyline(list(zip([s for s, _ in points], smoothed))),
                                fmt(smoothed[-1]), polyline(held),
                                tuple((f"{px(s):.1f}", f"{py(v):.1f}") for s, v in held)))
    x_ticks = [Tick(f"{px(v):.1f}", fmt(int(v))) for v in nice_ticks(0, x_max, 6)]
    y_ticks = [Tick(f"{py(v):.1f}", fmt(round(v, 10))) for v in nice_ticks(y_lo, y_hi, 5)]
    return LossChart(width, height, left, top, right, bottom, x_ticks, y_ticks, drawn)
