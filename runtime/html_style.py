"""The one style of every HTML report edgewise writes (``evaluate --html``, ``gate --html``, the
batch drift report): the stylesheet, the page frame, the colours, the colour scale of a change
and the axes of the bar charts.

Every page is self-contained: inline CSS and inline SVG, no script, nothing fetched from the
network, so a page can be archived as a CI artifact and opened anywhere.

Two rules keep the pages from misleading a reader:

* **Colour is absolute.** The colour of a change depends on that change alone, on a fixed scale
  (:func:`change_strength`), never on the other cells of the page: the same difference has the
  same colour in every report. The scale: the difference candidate − baseline, from white (no
  change) to full colour at :data:`FULL_CHANGE` (0.10), linearly; for MAE and RMSE, which are in
  the target's units, the difference relative to the baseline's value (full colour at 10 %); for
  every other metric (accuracy, precision, recall, F1, ROC-AUC, calibration error, R² on a 0..1
  scale, log loss in nats) the difference itself. Red where the candidate is worse, green where
  it is better.
* **Axes are stated and fixed.** A bar's length is proportional to its value on the axis drawn
  under it (:class:`Axis`), which starts at zero: 0..1 for metrics on a 0..1 scale whatever the
  values, 0..a round number above the largest value for the others. Differences get their own
  chart on a fixed symmetric axis (±0.10, or ±10 % for MAE and RMSE), so a 0.95 against 1.0
  is half of that axis, not a hairline; a difference beyond the axis is drawn to its end with a
  cut mark, and every bar has its number printed beside it.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

__all__ = [
    "BASELINE",
    "BATCH",
    "BETTER",
    "CANDIDATE",
    "DRIFT",
    "FULL_CHANGE",
    "REFERENCE",
    "RELATIVE_CHANGE_METRICS",
    "STYLESHEET",
    "UNIT_METRICS",
    "WORSE",
    "Axis",
    "change_background",
    "change_legend",
    "change_strength",
    "esc",
    "page",
    "relative_change",
    "share_axis",
    "swatch",
]

# ---- colours -------------------------------------------------------------------------------

CANDIDATE: Final = "#2563eb"
"""A candidate's (or a batch's) value."""
BASELINE: Final = "#9ca3af"
"""A baseline's value."""
REFERENCE: Final = BASELINE
"""A reference profile's share (the batch drift report's baseline)."""
BATCH: Final = CANDIDATE
WORSE: Final = "#dc2626"
"""Worse than the baseline; a drifting feature."""
DRIFT: Final = WORSE
BETTER: Final = "#16a34a"
"""Better than the baseline."""
_WORSE_RGB: Final = "220,38,38"
_BETTER_RGB: Final = "22,163,74"
_MAX_ALPHA: Final = 0.70

# ---- the colour scale of a change ------------------------------------------------------------

FULL_CHANGE: Final = 0.10
"""The change that gets full colour: 0.10, or 10 % of the baseline for
:data:`RELATIVE_CHANGE_METRICS`."""

UNIT_METRICS: Final = frozenset(
    {"accuracy", "precision", "recall", "f1", "roc_auc", "calibration_error", "r2"}
)
"""Metrics on a 0..1 scale (R² at most 1): their value axis is 0..1 whatever the values."""

RELATIVE_CHANGE_METRICS: Final = frozenset({"mae", "rmse"})
"""Metrics in the target's units: their change is measured relative to the baseline's value."""


def relative_change(metric: str, delta: float, base: float | None) -> float | None:
    """The change on the colour and difference scale: ``delta / |base|`` for
    :data:`RELATIVE_CHANGE_METRICS` (None without a baseline value; infinite when the baseline
    is 0 and the candidate is not), ``delta`` itself for every other metric."""
    if metric not in RELATIVE_CHANGE_METRICS:
        return delta
    if base is None:
        return None
    if base == 0:
        return 0.0 if delta == 0 else math.copysign(math.inf, delta)
    return delta / abs(base)


def change_strength(metric: str, delta: float | None, base: float | None) -> float:
    """How strongly a change is coloured, 0..1: linear in the change up to :data:`FULL_CHANGE`,
    whatever else is on the page."""
    if delta is None:
        return 0.0
    change = relative_change(metric, delta, base)
    if change is None or change == 0:
        return 0.0
    return min(abs(change) / FULL_CHANGE, 1.0)


def _tint(strength: float, worse: bool) -> str:
    rgb = _WORSE_RGB if worse else _BETTER_RGB
    return f"rgba({rgb},{_MAX_ALPHA * strength:.3f})"


def change_background(strength: float, worse: bool) -> str:
    """The ``style`` attribute (with a leading space) of a cell showing a change of ``strength``
    (:func:`change_strength`); empty for no change."""
    if strength <= 0:
        return ""
    return f' style="background: {_tint(strength, worse)}"'


def change_legend() -> str:
    """The legend of the change colours: the fixed scale, worse and better, with its steps."""
    steps = (0.025, 0.05, 0.075, FULL_CHANGE)
    worse = "".join(
        f'<span class="step" style="background: {_tint(s / FULL_CHANGE, True)}">{s:g}</span>'
        for s in reversed(steps)
    )
    better = "".join(
        f'<span class="step" style="background: {_tint(s / FULL_CHANGE, False)}">{s:g}</span>'
        for s in steps
    )
    return (
        f'<p class="scale meta">colour of candidate − baseline, the same on every page: worse '
        f'{worse}<span class="step">0</span>{better} better; full colour from a change of '
        f"{FULL_CHANGE:g} ({FULL_CHANGE:.0%} of the baseline for mae and rmse)</p>"
    )


def swatch(colour: str, label: str) -> str:
    """One legend entry: a colour square and its meaning."""
    return f'<span class="swatch" style="background:{colour}"></span>{esc(label)}'


# ---- axes ------------------------------------------------------------------------------------


def _round_up(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 x 10^k at or above ``value`` (> 0)."""
    exponent = math.floor(math.log10(value))
    for step in (1.0, 2.0, 2.5, 5.0, 10.0):
        candidate = step * 10.0**exponent
        if candidate >= value * (1 - 1e-12):
            return candidate
    return 10.0 ** (exponent + 1)  # pragma: no cover - the loop ends at 10


@dataclass(frozen=True)
class Axis:
    """A linear axis from ``low`` to ``high`` drawn over ``length`` pixels from ``origin``."""

    low: float
    high: float
    origin: float
    length: float

    @classmethod
    def for_metric(cls, metric: str, values: Iterable[float], origin: float, length: float) -> Axis:
        """The value axis of ``metric``: 0..1 for a 0..1 metric (lower when R² is negative),
        else 0..a round number at or above the largest value; always including zero."""
        seen = [v for v in values if math.isfinite(v)]
        if metric in UNIT_METRICS:
            low = min(0.0, *seen) if seen else 0.0
            low = -_round_up(-low) if low < 0 else 0.0
            return cls(low, 1.0, origin, length)
        top = max([0.0, *seen])
        return cls(0.0, _round_up(top) if top > 0 else 1.0, origin, length)

    @classmethod
    def for_change(cls, origin: float, length: float) -> Axis:
        """The fixed difference axis: -:data:`FULL_CHANGE` .. +:data:`FULL_CHANGE`."""
        return cls(-FULL_CHANGE, FULL_CHANGE, origin, length)

    def x(self, value: float) -> float:
        """The pixel of ``value``, clamped to the axis."""
        value = min(max(value, self.low), self.high)
        return self.origin + (value - self.low) / (self.high - self.low) * self.length

    def clipped(self, value: float) -> bool:
        """Whether ``value`` lies beyond the axis (its bar is cut at the end)."""
        return value < self.low or value > self.high

    def ticks(self, count: int = 4) -> list[float]:
        """``count + 1`` evenly spaced values from ``low`` to ``high``."""
        return [self.low + (self.high - self.low) * i / count for i in range(count + 1)]

    def svg(self, y: float, count: int = 4, percent: bool = False, grid_top: float = 0) -> str:
        """The axis line at ``y`` with labelled ticks (and light grid lines up to ``grid_top``)."""
        end = self.origin + self.length
        parts = [f'<line class="axis" x1="{self.origin}" y1="{y}" x2="{end}" y2="{y}"/>']
        for value in self.ticks(count):
            tx = self.x(value)
            label = f"{value:+.0%}" if percent and value else f"{value:.3g}"
            parts.append(
                f'<line class="grid" x1="{tx:.1f}" y1="{grid_top}" x2="{tx:.1f}" y2="{y + 4}"/>'
                f'<text x="{tx:.1f}" y="{y + 15}" text-anchor="middle">{label}</text>'
            )
        return "".join(parts)


def share_axis(top_share: float, origin: float, length: float) -> Axis:
    """The vertical axis of a distribution chart (shares of rows, 0..1): from zero to the first
    of 25 %, 50 %, 100 % at or above the largest share, so most charts share one scale."""
    high = next((s for s in (0.25, 0.5) if top_share <= s), 1.0)
    return Axis(0.0, high, origin, length)


# ---- the page --------------------------------------------------------------------------------

STYLESHEET: Final = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #111827;
       margin: 24px auto; max-width: 1200px; padding: 0 16px; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 18px; margin: 32px 0 10px; }
h3 { font-size: 15px; margin: 14px 0 6px; }
.meta { color: #4b5563; margin: 2px 0; } code { font-size: 12px; }
table { border-collapse: collapse; margin: 8px 0; font-size: 13px; }
th, td { border: 1px solid #e5e7eb; padding: 3px 8px; text-align: right; white-space: nowrap; }
th { background: #f9fafb; font-weight: 600; position: sticky; top: 0; }
td.key, th.key, td.name, th.name, td.kind, th.kind, td.status, th.status { text-align: left; }
td.key, th.key { white-space: normal; max-width: 360px; }
table.wide { width: 100%; } table.wide th, td.name, td.status { white-space: normal; }
td.status { min-width: 220px; }
tr.small td { color: #9ca3af; }
.delta { font-size: 12px; color: #4b5563; }
.badge { display: inline-block; padding: 2px 10px; border-radius: 10px; color: white;
         font-weight: 600; }
.pass { background: #16a34a; } .fail { background: #dc2626; } .skip { background: #9ca3af; }
.verdict { padding: 10px 14px; border-radius: 6px; font-weight: 600; margin: 12px 0; }
.verdict.drift { background: #fde8e6; color: #9b1c13; }
.verdict.ok { background: #e6f4ea; color: #1e6b34; }
.verdict.na { background: #eef0f3; color: #40464f; }
tr.drift td.status { color: #b91c1c; font-weight: 600; }
tr.warn td.status { color: #a05a00; }
.grid, .charts { display: flex; flex-wrap: wrap; gap: 16px; }
.card, figure.chart { margin: 0; border: 1px solid #e5e7eb; border-radius: 6px;
                      padding: 10px 12px; }
figure.chart.drift { border-color: #e2a29c; }
figcaption { font-weight: 600; margin-bottom: 2px; }
figcaption span { font-weight: normal; color: #4b5563; font-size: 12px; }
.legend { font-size: 12px; color: #4b5563; margin: 6px 0 12px; }
.swatch { display: inline-block; width: 12px; height: 12px; margin: 0 4px 0 12px;
          vertical-align: -1px; }
.scale .step { display: inline-block; min-width: 34px; text-align: center; font-size: 11px;
               border: 1px solid #e5e7eb; }
svg text { font: 11px system-ui, sans-serif; fill: #111827; }
svg line.axis { stroke: #6b7280; } svg line.grid { stroke: #e5e7eb; }
svg line.zero { stroke: #6b7280; stroke-dasharray: 2,2; }
details { margin: 6px 0; }
"""
"""The one stylesheet of every report (each page embeds it)."""


def esc(text: object) -> str:
    """``text`` escaped for HTML text and attribute values."""
    return html.escape(str(text), quote=True)


def page(title: str, body: Iterable[str]) -> str:
    """A self-contained HTML document: ``title``, :data:`STYLESHEET` and ``body``'s parts."""
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{STYLESHEET}</style></head><body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
