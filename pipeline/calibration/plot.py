"""The picture of a calibration file (``edgeprune calibrate`` writes it beside the JSON)."""

from __future__ import annotations

from pathlib import Path

from pipeline.calibration.file import Calibration


def uniform_points(cal: Calibration) -> list[tuple[float, float]]:
    """The measured (ratio, accuracy) points with the same ratio on every slice."""
    return sorted((r[0], a) for r, a in cal.accuracy_points if len(set(r)) == 1)


def plot_calibration(cal: Calibration, path: str | Path) -> Path:
    """Three panels: latency vs ratio per slice with the fitted lines (the paper's Fig. 3),
    measured vs predicted accuracy, and accuracy vs a uniform ratio (Fig. 4)."""
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    ax = axes[0]
    grid = np.linspace(0.0, max(cal.ratios), 50)
    for s in cal.slices:
        r = [p[0] for p in s.points]
        (line,) = ax.plot(
            r,
            [1e3 * p[1] for p in s.points],
            "o",
            label=f"stage {s.stage} [{s.start},{s.end}) on {s.device}: R² {s.fit.r2:.3f}",
        )
        ax.plot(grid, 1e3 * s.fit.predict(grid), "-", color=line.get_color(), alpha=0.7)
    where = "emulated device" if cal.meta.get("emulated") else "this machine"
    clock = cal.meta.get("latency", {}).get("clock", "wall")
    ax.set(
        xlabel="pruning ratio of the slice",
        ylabel=f"latency (ms, {where}, batch 1, median {clock} time)",
        title="Slice latency t_i(p) = a_i p + b_i",
    )
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)

    ax = axes[1]
    measured = np.asarray([a for _, a in cal.accuracy_points])
    predicted = np.asarray(
        cal.accuracy_fit.predict(np.asarray([r for r, _ in cal.accuracy_points]))
    )
    ax.scatter(100 * measured, 100 * predicted, s=14, alpha=0.7)
    lim = [min(measured.min(), predicted.min()) * 100 - 2, 100]
    ax.plot(lim, lim, "k--", lw=0.8)
    a_min = cal.meta.get("accuracy_fit_check", {}).get("a_min")
    if a_min is not None:
        ax.axvline(100 * a_min, color="tab:red", ls=":", lw=0.8)
        ax.axhline(
            100 * a_min,
            color="tab:red",
            ls=":",
            lw=0.8,
            label=f"a_min {a_min:g}: upper left = falsely feasible",
        )
        ax.legend(fontsize=7, loc="upper left")
    ax.set(
        xlabel="measured accuracy (%)",
        ylabel="predicted accuracy (%)",
        xlim=lim,
        ylim=lim,
        title=f"Accuracy fit: max |error| {100 * cal.accuracy_fit.max_abs_error:.1f} pts "
        f"({len(measured)} vectors)",
    )
    ax.grid(alpha=0.3)

    ax = axes[2]
    pts = uniform_points(cal)
    n = len(cal.slices)
    ax.plot([r for r, _ in pts], [100 * a for _, a in pts], "o", label="measured")
    ax.plot(
        grid,
        100 * cal.accuracy_fit.predict(np.repeat(grid[:, None], n, axis=1)),
        "-",
        label="fit a(p)",
    )
    ax.axhline(100 / cal.num_classes, color="grey", ls=":", lw=0.8, label="chance")
    ax.set(
        xlabel="uniform pruning ratio (every slice)",
        ylabel="accuracy (%)",
        ylim=(0, 100),
        title=f"Accuracy vs uniform ratio ({cal.meta.get('split', '?')} split)",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
