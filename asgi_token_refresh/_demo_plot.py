"""The demo's picture: for each column over time, refresh calls per second, ``invalid_grant``
answers per second and sessions alive, drawn from the timestamps its provider recorded.

matplotlib (the ``demo`` extra) draws on the Agg canvas directly: no pyplot, no GUI backend,
nothing global touched.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from ._demo import DemoReport

__all__ = ["MATPLOTLIB_MISSING", "write_png"]

MATPLOTLIB_MISSING = (
    "no picture: matplotlib is not installed "
    "(scripts/demo installs it; or pip install 'asgi-token-refresh[demo]')."
)
_COLOURS = {"naive": "#d62728", "authlib": "#ff7f0e", "single-flight": "#2ca02c"}
_ROWS = ("refresh calls / s", "invalid_grant / s", "sessions alive")


def write_png(reports: Sequence[DemoReport], path: Path, *, title: str = "") -> Path:
    """Draw one column of three panels per report and save them as a PNG at ``path``.

    ImportError when matplotlib is missing.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    end = max((r.timeline.end for r in reports), default=1.0) or 1.0
    width = max(0.05, round(end / 150, 2))  # seconds per bar: ~150 bars over the run
    figure = Figure(figsize=(4.2 * len(reports) + 1, 7.5), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    grid = figure.subplots(3, len(reports), sharex=True, sharey="row", squeeze=False)
    for column, report in enumerate(reports):
        colour = _COLOURS.get(report.mode, "#1f77b4")
        calls, refused, alive = (grid[row][column] for row in range(3))
        timeline = report.timeline
        calls.set_title(report.mode, fontweight="bold", color=colour)
        _rate(calls, timeline.refresh_calls, end, width, colour)
        _caption(calls, f"{report.provider_calls:,} calls")
        _rate(refused, timeline.invalid_grant, end, width, colour)
        _caption(refused, f"{report.invalid_grant:,} invalid_grant")
        times = [0.0, *sorted(timeline.revocations), end]
        counts = [report.sessions - n for n in range(len(times) - 1)]
        alive.step(times, [*counts, counts[-1]], where="post", color=colour, linewidth=2)
        alive.set_ylim(0, max(1, report.sessions) * 1.1)
        _caption(alive, f"{report.sessions_revoked:,} of {report.sessions:,} lost", y=0.55)
        alive.set_xlabel("seconds since login")
        for axes in (calls, refused, alive):
            for burst in timeline.bursts:
                axes.axvline(burst, color="grey", linestyle=":", linewidth=0.8)
            axes.grid(axis="y", alpha=0.3)
            axes.set_xlim(0, end)
    for row, label in enumerate(_ROWS):
        grid[row][0].set_ylabel(label)
    figure.suptitle(
        title or "Refresh storm against a strict provider (dotted: expiry-boundary bursts)"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


def _rate(axes: Axes, times: Sequence[float], end: float, width: float, colour: str) -> None:
    """Events per second in bars ``width`` seconds wide."""
    bins = max(1, int(end / width) + 1)
    counts = [0] * bins
    for t in times:
        counts[min(bins - 1, max(0, int(t / width)))] += 1
    edges = [i * width for i in range(bins + 1)]
    axes.stairs([n / width for n in counts], edges, fill=True, color=colour)


def _caption(axes: Axes, text: str, y: float = 0.92) -> None:
    axes.text(
        0.98, y, text, transform=axes.transAxes, ha="right", va="top", fontsize=9,
        bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.8, "edgecolor": "none"},
    )  # fmt: skip
