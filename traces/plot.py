"""Compare traces in one PNG (e.g. a real trace and a generated one).

Rows: per-minute image counts over one day of each trace (for a trace longer than a day,
its busiest local day), then three panels: images per visit (log-spaced bins), the index of
dispersion of per-minute counts (Poisson = 1), and the share of images per hour of day.
Uses matplotlib's object API with the Agg canvas: no pyplot state, no display needed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np

from traces.format import Trace
from traces.stats import (
    VISIT_GAP_S,
    images_per_visit,
    index_of_dispersion,
    per_minute_counts,
    time_of_day_histogram,
    visits,
)

DAY_S = 86400.0
_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def busiest_day(trace: Trace) -> tuple[float, float]:
    """``(start, end)`` in trace seconds of the local day with the most images.

    A trace of at most one day is returned whole.
    """
    if trace.span_s <= DAY_S or not len(trace):
        return 0.0, max(trace.span_s, 60.0)
    offset = trace.clock_offset_s
    days = ((np.asarray(trace.times()) + offset) // DAY_S).astype(np.int64)
    best = int(np.bincount(days).argmax())
    start = max(0.0, best * DAY_S - offset)
    return start, min(trace.span_s, best * DAY_S - offset + DAY_S)


def plot_traces(
    traces: Sequence[Trace],
    path: str | Path,
    labels: Sequence[str] | None = None,
    visit_gap_s: float = VISIT_GAP_S,
    title: str | None = None,
) -> Path:
    """Write the comparison figure of ``traces`` to ``path`` (PNG) and return the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not traces:
        raise ValueError("nothing to plot")
    labels = list(labels) if labels is not None else [t.name for t in traces]
    n = len(traces)
    fig = Figure(figsize=(12, 2.3 * n + 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(n + 1, 3, height_ratios=[1.0] * n + [1.5])
    fig.suptitle(title or "camera-trap arrivals: " + " vs ".join(labels), fontsize=12)

    minute_axes: list[Any] = []
    for row, (trace, label) in enumerate(zip(traces, labels, strict=True)):
        colour = _COLOURS[row % len(_COLOURS)]
        ax = fig.add_subplot(grid[row, :], sharey=minute_axes[0] if minute_axes else None)
        minute_axes.append(ax)
        lo, hi = busiest_day(trace)
        counts = per_minute_counts(trace)[int(lo // 60) : math.ceil(hi / 60)]
        clock = (trace.clock_offset_s + lo) / 3600 + np.arange(len(counts)) / 60
        base = math.floor(clock[0] / 24) * 24 if len(clock) else 0.0
        ax.vlines(clock - base, 0, counts, color=colour, linewidth=0.8)
        day = (
            (trace.t0 + timedelta(seconds=lo)).date().isoformat()
            if trace.t0 is not None
            else f"from t={lo:.0f} s"
        )
        shown = int(counts.sum())
        ax.set_title(
            f"{label}: images per minute, {day} ({shown} of {len(trace)} images, "
            f"{len(trace.cameras)} cameras)",
            fontsize=9,
            loc="left",
        )
        ax.set_xlim(0, 24)
        ax.set_xticks(range(0, 25, 2))
        ax.set_ylabel("images/min")
        ax.grid(alpha=0.3)
    minute_axes[-1].set_xlabel("local time of day (h)")

    ax_ipv = fig.add_subplot(grid[n, 0])
    sizes = [images_per_visit(visits(t, visit_gap_s)) for t in traces]
    top = max((int(s.max()) for s in sizes if s.size), default=1)
    bins = np.unique(np.round(np.logspace(0, math.log10(top + 1), 25)).astype(int))
    bins = np.append(bins, bins[-1] + 1) if bins.size < 2 else bins
    for i, (s, label) in enumerate(zip(sizes, labels, strict=True)):
        if s.size:
            weights = np.full(s.size, 1.0 / s.size)
            ax_ipv.hist(
                s,
                bins=bins.tolist(),
                weights=weights,
                histtype="step",
                linewidth=1.6,
                color=_COLOURS[i % len(_COLOURS)],
                label=f"{label} (median {np.median(s):.0f}, mean {s.mean():.1f})",
            )
    ax_ipv.set_xscale("log")
    ax_ipv.set_yscale("log")
    ax_ipv.set_xlabel(f"images per visit (gap > {visit_gap_s:g} s splits visits)")
    ax_ipv.set_ylabel("fraction of visits")
    if ax_ipv.get_legend_handles_labels()[0]:
        ax_ipv.legend(fontsize=7, loc="best")
    ax_ipv.grid(alpha=0.3, which="both")

    ax_d = fig.add_subplot(grid[n, 1])
    ds = [index_of_dispersion(per_minute_counts(t)) for t in traces]
    xs = np.arange(n)
    ax_d.bar(
        xs,
        [0 if math.isnan(d) else d for d in ds],
        color=[_COLOURS[i % len(_COLOURS)] for i in range(n)],
    )
    for x, d in zip(range(n), ds, strict=True):
        ax_d.text(
            x,
            0 if math.isnan(d) else d,
            "n/a" if math.isnan(d) else f"{d:.1f}",
            ha="center",
            va="bottom",
            fontsize=9,
        )
    ax_d.axhline(1.0, color="black", linestyle="--", linewidth=1)
    ax_d.text(-0.45, 1.0, "Poisson = 1", ha="left", va="bottom", fontsize=8)
    finite = [d for d in ds if not math.isnan(d)]
    ax_d.set_ylim(0, 1.15 * max([2.0, *finite]))
    ax_d.set_xticks(xs, labels, fontsize=8, rotation=10)
    ax_d.set_ylabel("var / mean of per-minute counts")
    ax_d.set_title("index of dispersion", fontsize=9)

    ax_h = fig.add_subplot(grid[n, 2])
    width = 0.8 / n
    for i, (trace, label) in enumerate(zip(traces, labels, strict=True)):
        hist = time_of_day_histogram(trace).astype(float)
        share = hist / hist.sum() if hist.sum() else hist
        ax_h.bar(
            np.arange(24) + (i - (n - 1) / 2) * width,
            share,
            width=width,
            color=_COLOURS[i % len(_COLOURS)],
            label=label,
        )
    ax_h.set_xlabel("hour of day")
    ax_h.set_ylabel("share of images")
    ax_h.set_xticks(range(0, 24, 3))
    ax_h.legend(fontsize=7)
    ax_h.set_title("time of day", fontsize=9)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
