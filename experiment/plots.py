"""Plots of experiment runs (matplotlib, Agg): a timeline per run and a latency CDF.

- :func:`plot_timeline`: three panels sharing the time axis (seconds on the shared experiment
  clock): arrivals per second, end-to-end latency of every request (dots, coloured by whether
  it met the SLO) with a rolling p95 and the SLO line, and each stage's pruning level as a
  step plot. Every node's transient slowdown windows (and CPU-hog windows) are shaded on all
  panels.
- :func:`plot_cdf`: the latency CDF, one curve per policy, with the SLO marked.
- :func:`plot_compare_timelines`: the latency panels of several policies stacked, same axes.
- :func:`plot_tradeoff`: SLO attainment against accuracy, one point per policy and repetition.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from bus.observer import Events
from experiment.config import ExperimentConfig
from experiment.report import first_by_id, level_timeline
from pipeline.pruning import DEFAULT_RATIOS

POLICY_COLORS = {
    "static": "#d62728",
    "static:0": "#d62728",
    "reactive": "#1f77b4",
    "proactive": "#2ca02c",
    "oracle": "#000000",
}
_STATIC_COLORS = ["#ff7f0e", "#8c564b", "#e377c2", "#bcbd22", "#17becf"]


def policy_color(policy: str) -> str:
    """A fixed colour per policy; static levels above 0 in warm shades."""
    if policy in POLICY_COLORS:
        return POLICY_COLORS[policy]
    _, _, level = policy.partition(":")
    return _STATIC_COLORS[int(level) % len(_STATIC_COLORS)] if level.isdigit() else "grey"


_SHADES = ["#ff7f0e", "#9467bd", "#8c564b", "#e377c2"]


def _latencies(events: Events, clock_start: float) -> tuple[np.ndarray, np.ndarray]:
    exits = first_by_id(events["exit"])
    t = np.asarray([float(e["entry_ts"]) - clock_start for e in exits.values()])
    lat = np.asarray([float(e["latency_s"]) * 1e3 for e in exits.values()])
    order = np.argsort(t)
    return t[order], lat[order]


def _rolling_p95(
    t: np.ndarray, lat: np.ndarray, width_s: float = 2.0
) -> tuple[np.ndarray, np.ndarray]:
    if t.size == 0:
        return t, lat
    grid = np.arange(t[0], t[-1] + width_s / 2, width_s / 4)
    out = np.full(grid.shape, np.nan)
    for i, g in enumerate(grid):
        sel = lat[(t >= g - width_s) & (t < g)]
        if sel.size:
            out[i] = np.percentile(sel, 95)
    return grid, out


def _shade(ax: Axes, config: ExperimentConfig, label: bool) -> None:
    for k, node in enumerate(config.nodes):
        color = _SHADES[k % len(_SHADES)]
        for j, w in enumerate(node.emulation.windows):
            ax.axvspan(
                w.start_s,
                w.end_s,
                color=color,
                alpha=0.13,
                lw=0,
                label=f"{node.name} slowed x{w.factor:g}" if label and j == 0 else None,
            )
        for j, (a, b) in enumerate(node.hog_windows):
            ax.axvspan(
                a,
                b,
                facecolor="none",
                edgecolor=color,
                hatch="//",
                alpha=0.4,
                lw=0,
                label=f"{node.name} CPU hog" if label and j == 0 else None,
            )


def plot_timeline(
    config: ExperimentConfig, policy: str, events: Events, clock_start: float, path: Path
) -> Path:
    """The run's timeline (see the module docstring)."""
    t, lat = _latencies(events, clock_start)
    sends = np.asarray(
        sorted(float(s["entry_ts"]) - clock_start for s in first_by_id(events["send"]).values())
    )
    fig, axes = plt.subplots(
        3, 1, figsize=(12, 8.5), sharex=True, gridspec_kw={"height_ratios": [1, 2.2, 1.2]}
    )
    steps = level_timeline(events, len(config.nodes), clock_start)
    last_change = max((x for st in steps for x, _ in st if np.isfinite(x)), default=0.0)
    end = (
        max(float(t[-1]) if t.size else 0.0, float(sends[-1]) if sends.size else 0.0, last_change)
        + 1
    )

    ax = axes[0]
    if sends.size:
        bins = np.arange(min(0.0, float(sends[0])), end + 1, 1.0)
        ax.hist(sends, bins=bins, color="#555555", alpha=0.8, label="images sent per s")
    _shade(ax, config, label=True)
    ax.set_ylabel("arrivals / s")
    ax.legend(loc="upper right", fontsize=8, ncol=3)
    ax.set_title(
        f"{config.name}: policy {policy}, SLO {config.slo_ms:g} ms "
        f"(trace {', '.join(config.trace.names)}, x{config.trace.compression:g})"
    )

    ax = axes[1]
    slo = config.slo_ms
    if t.size:
        ok = lat <= slo
        ax.scatter(t[ok], lat[ok], s=6, color="#1f77b4", alpha=0.6, label="met the SLO")
        ax.scatter(t[~ok], lat[~ok], s=6, color="#d62728", alpha=0.6, label="missed the SLO")
        g, p95 = _rolling_p95(t, lat)
        ax.plot(g, p95, color="black", lw=1.2, label="rolling p95 (2 s)")
        ax.set_yscale("log")
    ax.axhline(slo, color="black", ls="--", lw=1, label=f"SLO {slo:g} ms")
    _shade(ax, config, label=False)
    ax.set_ylabel("end-to-end latency (ms, log)")
    ax.legend(loc="upper right", fontsize=8, ncol=4)
    ax.grid(alpha=0.3, which="both")

    ax = axes[2]
    ratios = config.ratios or DEFAULT_RATIOS
    for node, st in zip(config.nodes, steps, strict=True):
        xs = [0.0 if not np.isfinite(x) else max(0.0, x) for x, _ in st] + [end]
        ys = [lv for _, lv in st] + [st[-1][1]]
        ax.step(xs, ys, where="post", lw=2, label=f"stage {node.stage} ({node.name})")
    _shade(ax, config, label=False)
    top = len(ratios) - 1
    ax.set_ylim(-0.3, top + 0.3)
    ax.set_yticks(range(top + 1))
    ax.set_ylabel("pruning level")
    ax.set_xlabel("seconds on the experiment clock (0 = trace replay start)")
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    axes[0].set_xlim(min(0.0, float(sends[0]) if sends.size else 0.0) - 1, end)
    return _save(fig, path)


def plot_cdf(
    config: ExperimentConfig, runs: Mapping[str, tuple[Events, float]], path: Path
) -> Path:
    """Latency CDF per policy (``runs``: policy -> (events, clock start))."""
    fig, ax = plt.subplots(figsize=(8, 5))
    for policy, (events, clock_start) in runs.items():
        _, lat = _latencies(events, clock_start)
        if not lat.size:
            continue
        xs = np.sort(lat)
        ys = np.arange(1, xs.size + 1) / xs.size
        ax.plot(
            xs,
            ys,
            lw=2,
            color=policy_color(policy),
            label=f"{policy} "
            f"(p95 {np.percentile(lat, 95):.0f} ms, "
            f"{100 * np.mean(lat <= config.slo_ms):.0f}% within SLO)",
        )
    ax.axvline(config.slo_ms, color="black", ls="--", lw=1, label=f"SLO {config.slo_ms:g} ms")
    ax.set_xscale("log")
    ax.set(
        xlabel="end-to-end latency (ms, log)",
        ylabel="fraction of requests",
        title=f"{config.name}: latency CDF",
        ylim=(0, 1.01),
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower right", fontsize=9)
    return _save(fig, path)


def plot_compare_timelines(
    config: ExperimentConfig, runs: Mapping[str, tuple[Events, float]], path: Path
) -> Path:
    """One latency panel per policy (same axes), levels on a second axis, windows shaded."""
    n = len(runs)
    fig, axes = plt.subplots(
        n, 1, figsize=(12, 2.8 * n + 0.6), sharex=True, sharey=True, squeeze=False
    )
    for ax, (policy, (events, clock_start)) in zip(axes[:, 0], runs.items(), strict=True):
        t, lat = _latencies(events, clock_start)
        if t.size:
            ax.scatter(t, lat, s=5, color=policy_color(policy), alpha=0.5)
            g, p95 = _rolling_p95(t, lat)
            ax.plot(g, p95, color="black", lw=1)
            ax.set_yscale("log")
        ax.axhline(config.slo_ms, color="black", ls="--", lw=1)
        _shade(ax, config, label=ax is axes[0, 0])
        ax.set_ylabel(f"{policy}\nlatency (ms)")
        ax.grid(alpha=0.3, which="both")
        twin = ax.twinx()
        for node, st in zip(
            config.nodes, level_timeline(events, len(config.nodes), clock_start), strict=True
        ):
            xs = [max(0.0, x) if np.isfinite(x) else 0.0 for x, _ in st]
            twin.step(
                [*xs, t[-1] if t.size else 1.0],
                [lv for _, lv in st] + [st[-1][1]],
                where="post",
                lw=1.5,
                alpha=0.8,
                label=f"level, stage {node.stage}",
            )
        twin.set_ylim(-0.2, 5.5)
        twin.set_ylabel("level")
        if ax is axes[0, 0]:
            twin.legend(loc="upper left", fontsize=8)
            ax.legend(loc="upper right", fontsize=8)
    axes[0, 0].set_title(
        f"{config.name}: latency (dots, rolling p95) and levels per policy; "
        f"dashed: SLO {config.slo_ms:g} ms"
    )
    axes[-1, 0].set_xlabel("seconds on the experiment clock")
    return _save(fig, path)


def plot_tradeoff(
    config: ExperimentConfig, runs: Mapping[str, Sequence[Mapping[str, Any]]], path: Path
) -> Path:
    """SLO attainment against live accuracy, one point per policy and repetition (``runs``:
    policy -> the run summaries). Up and right is better on both axes: a static level up and
    right of a controller beats it."""
    fig, ax = plt.subplots(figsize=(7, 5.5))
    for policy, summaries in runs.items():
        points = [
            (s["accuracy"], s["slo_attainment"])
            for s in summaries
            if s.get("accuracy") is not None and s.get("slo_attainment") is not None
        ]
        if not points:
            continue
        xs, ys = zip(*points, strict=True)
        ax.scatter(
            [100 * x for x in xs],
            [100 * y for y in ys],
            s=60,
            color=policy_color(policy),
            alpha=0.8,
            edgecolor="black",
            lw=0.5,
            marker="s" if policy.startswith("static") else "o",
            label=f"{policy} ({len(points)} run{'s' if len(points) > 1 else ''})",
        )
    ax.set(
        xlabel="live accuracy (%, true labels)",
        ylabel=f"SLO attainment (%, latency <= {config.slo_ms:g} ms)",
        title=f"{config.name}: SLO attainment vs accuracy (up and right is better)",
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=9)
    return _save(fig, path)


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
