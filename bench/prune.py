"""`edgeprune bench prune`: what run-time pruning buys in measured latency, and what it costs.

For every slice (default: every block its own slice) and every level, on ONE torch thread and
batch 1: the latency of the slice as a node runs it (PrunableSlice.forward: scatter of the kept
input channels, channel gather, pruned body) and of the body alone (the difference is the
bookkeeping overhead); its speedup over level 0 against its MAC reduction (MACs at level 0 /
MACs at the level). Whole-model rows sum the slices at one level (each node runs one slice).
Rounds interleave the levels so all see the same machine state; in each, every (slice, level)
runs once untimed, then 10 timed calls (perf_counter) in the steady state of a node that runs
one slice. Medians and 90th percentiles are reported.

Start-up: each variant's build time, and PrunableSlice construction with and without BatchNorm
re-estimation. Switching: one set_level call (median of thousands), and each slice's first
output after a switch minus its next forward (a rebuild would add tens of ms). Goals (issue 2):
whole-model speedup at ratio 0.3 >= 0.8 x its MAC reduction, switch <= 1 ms. Tiny slices (stem,
head) are dominated by fixed per-call costs and noisy; the headline is the whole model.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.goals import BenchReport, Goal, GoalSpec
from edgeprune.commands._common import add_checkpoint, add_json, format_table

if TYPE_CHECKING:
    import torch

    from pipeline.checkpoint import Checkpoint
    from pipeline.placement import SliceBounds
    from pipeline.pruning import PrunableSlice, PrunedVariant

HEADLINE_RATIO = 0.3
SPEEDUP_GOAL = 0.8  # measured speedup >= this x MAC reduction
SWITCH_GOAL_MS = 1.0
PAPER_PRUNE_STEP_MS = 25.0  # the paper's pruning step on a Raspberry Pi 4B
BLOCK = 10  # consecutive timed calls of one (slice, level) per round
GOALS = (
    GoalSpec(f"speedup_over_mac_at_{HEADLINE_RATIO}", ">=", SPEEDUP_GOAL),
    GoalSpec("switch_ms", "<=", SWITCH_GOAL_MS),
)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "prune",
        help="pruned-slice latency vs MAC reduction, build and switch time",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_checkpoint(parser)
    parser.add_argument(
        "--cuts",
        default=None,
        help="cut points, e.g. 2,4 (default: every block its own slice, "
        "1,2,3,4 for the default model)",
    )
    parser.add_argument(
        "--repeats",
        type=_at_least(BLOCK),
        default=300,
        help=f"timed calls per slice and level, in rounds of {BLOCK} (default 300)",
    )
    parser.add_argument(
        "--switch-runs",
        type=_at_least(100),
        default=5000,
        help="timed set_level calls (default 5000)",
    )
    parser.add_argument(
        "--switch-trials",
        type=_at_least(10),
        default=200,
        help="switch-then-forward trials per slice (default 200)",
    )
    parser.add_argument(
        "--round-to",
        type=_at_least(1),
        default=8,
        help="kept channel counts are rounded to a multiple of this (default 8)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("runs/bench/prune"),
        help="output prefix: writes PREFIX.json and PREFIX.png (default runs/bench/prune)",
    )
    add_json(parser)
    parser.set_defaults(func=run)


def _at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        if not text.isdigit() or int(text) < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return int(text)

    return parse


def _pct(samples: Sequence[float], q: int) -> float:
    """The q-th percentile (1 <= q <= 99)."""
    return statistics.quantiles(samples, n=100, method="inclusive")[q - 1]


def _split_variant(
    variant: PrunedVariant,
) -> tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
    """(gather, body) of a variant's module; gather is the identity when it reads all inputs."""
    from torch import nn

    from pipeline.pruning import ChannelGather

    module = variant.module
    if isinstance(module, nn.Sequential) and isinstance(module[0], ChannelGather):
        return module[0], module[1]
    return (lambda t: t), module


def _build(
    ckpt: Checkpoint, bounds: Sequence[SliceBounds], round_to: int
) -> tuple[list[PrunableSlice], dict[str, Any]]:
    """Build every slice without and with BN re-estimation; keep the ones nodes would run."""
    from pipeline.reference import build_prunable

    model = ckpt.build()
    t0 = time.perf_counter()  # absorbs one-time library warm-up (tracing, allocator)
    build_prunable(ckpt, bounds[-1], round_to=round_to, recalibrate_bn=False, model=model)
    warmup_s = time.perf_counter() - t0
    recal = ckpt.calibration_images is not None
    slices, no_bn, with_bn = [], [], []
    for b in bounds:
        t0 = time.perf_counter()
        plain = build_prunable(ckpt, b, round_to=round_to, recalibrate_bn=False, model=model)
        no_bn.append(time.perf_counter() - t0)
        if recal:
            t0 = time.perf_counter()
            slices.append(
                build_prunable(ckpt, b, round_to=round_to, recalibrate_bn=True, model=model)
            )
            with_bn.append(time.perf_counter() - t0)
        else:
            slices.append(plain)
    return slices, {
        "warmup_s": warmup_s,
        "no_bn_s": no_bn,
        "with_bn_s": with_bn if recal else None,
        "bn_reestimated": recal,
    }


Inputs = list[list[tuple["torch.Tensor", "torch.Tensor | None"]]]


def _inputs(slices: Sequence[PrunableSlice], x: torch.Tensor) -> Inputs:
    """[level][slice]: what the slice receives when every slice runs at that level."""
    out: Inputs = []
    for level in range(slices[0].num_levels):
        h, channels = x, None
        row: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        for s in slices:
            row.append((h, channels))
            s.set_level(level)
            y = s(h, channels)
            h, channels = y.tensor, y.channels
        out.append(row)
    return out


def _latencies(
    slices: Sequence[PrunableSlice], inputs: Inputs, repeats: int
) -> list[list[dict[str, list[float]]]]:
    """[level][slice]: samples (s) of the node forward and of the body alone."""
    import torch

    from pipeline.pruning import scatter_channels

    n_levels = slices[0].num_levels
    # (level, slice index, kind, call); the level is set before the timer starts
    jobs: list[tuple[int, int, str, Callable[[], object]]] = []
    for level in range(n_levels):
        for i, (s, (h, channels)) in enumerate(zip(slices, inputs[level], strict=True)):
            gather, body = _split_variant(s.variants[level])
            body_in = gather(scatter_channels(h, channels, s.model_slice.in_channels))
            jobs.append((level, i, "node", functools.partial(s, h, channels)))
            jobs.append((level, i, "body", functools.partial(body, body_in)))
    node: list[list[dict[str, list[float]]]] = [
        [{"node": [], "body": []} for _ in slices] for _ in range(n_levels)
    ]
    rounds = -(-repeats // BLOCK)
    with torch.no_grad():
        for rnd in range(1 + rounds):  # round 0 is the warm-up
            for level, i, kind, fn in jobs:
                slices[i].set_level(level)
                fn()  # untimed: the block sees the steady state a node runs in
                samples = node[level][i][kind]
                for _ in range(BLOCK):
                    t0 = time.perf_counter()
                    fn()
                    dt = time.perf_counter() - t0
                    if rnd:
                        samples.append(dt)
    return node


def _switch(
    slices: Sequence[PrunableSlice], inputs: Inputs, runs: int, trials: int
) -> dict[str, Any]:
    """set_level call time, and switch-to-first-output minus a normal forward, per slice.

    For every slice (as its node runs it): median(first forward after a switch) - median(the
    forward right after it), summed over the slices. A difference of medians is disturbed less
    by a busy machine's preemptions than the median of per-trial differences. The control
    repeats this without a change of level; what a switch adds beyond the control is the new
    level's weights not being in the CPU caches yet.
    """
    import torch

    n_levels = slices[0].num_levels
    calls: list[float] = []
    timer: list[float] = []
    for k in range(runs):
        s = slices[k % len(slices)]
        target = (s.level + 1 + (k // len(slices)) % (n_levels - 1)) % n_levels
        t0 = time.perf_counter()
        s.set_level(target)
        calls.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        timer.append(time.perf_counter() - t0)
    # per slice: first forward after a switch / the next one; the same without a switch
    keys = ("first", "next", "same_first", "same_next")
    runs_ms: list[dict[str, list[float]]] = [{k: [] for k in keys} for _ in slices]
    with torch.no_grad():
        for k in range(trials):
            levels = [(s.level + 1 + k % (n_levels - 1)) % n_levels for s in slices]
            for prefix in ("", "same_"):  # the control runs after the others, as the switch
                for i, (s, level) in enumerate(zip(slices, levels, strict=True)):
                    h, channels = inputs[level][i]
                    t0 = time.perf_counter()
                    s.set_level(level)
                    s(h, channels)
                    t1 = time.perf_counter()
                    s(h, channels)
                    runs_ms[i][prefix + "first"].append((t1 - t0) * 1e3)
                    runs_ms[i][prefix + "next"].append((time.perf_counter() - t1) * 1e3)
    med = {k: [statistics.median(r[k]) for r in runs_ms] for k in keys}
    return {
        "set_level_ms": statistics.median(calls) * 1e3,
        "set_level_p99_ms": _pct(calls, 99) * 1e3,
        "set_level_max_ms": max(calls) * 1e3,
        "set_level_calls": runs,
        "timer_overhead_ms": statistics.median(timer) * 1e3,
        "first_output_ms": sum(med["first"]),
        "next_output_ms": sum(med["next"]),
        "first_output_extra_ms": sum(med["first"]) - sum(med["next"]),
        "same_level_extra_ms": sum(med["same_first"]) - sum(med["same_next"]),
        "per_slice_extra_ms": [a - b for a, b in zip(med["first"], med["next"], strict=True)],
        "trials": trials,
    }


def measure(
    ckpt_path: Path | None,
    cuts: str | None,
    repeats: int,
    switch_runs: int,
    switch_trials: int,
    round_to: int,
) -> dict[str, Any]:
    """Run the whole benchmark on one torch thread; returns the JSON report."""
    import os
    import platform

    import torch

    from pipeline.checkpoint import load_checkpoint
    from pipeline.slicing import parse_cuts

    load_before = os.getloadavg()[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ckpt = load_checkpoint(ckpt_path)
        n_blocks = ckpt.build().num_blocks
        bounds = parse_cuts(cuts if cuts is not None else list(range(1, n_blocks)), n_blocks)
        slices, build = _build(ckpt, bounds, round_to)
        x = ckpt.calibration_tensor(1)
        if x is None:
            x = torch.randn(
                1, *slices[0].model_slice.in_shape, generator=torch.Generator().manual_seed(0)
            )
        inputs = _inputs(slices, x)
        node = _latencies(slices, inputs, repeats)
        switch = _switch(slices, inputs, switch_runs, switch_trials)
    finally:
        torch.set_num_threads(threads)
    report = _report(slices, node, build, switch)
    report.update(
        {
            "bench": "prune",
            "checkpoint": str(ckpt.path),
            "model": ckpt.config.name,
            "model_hash": ckpt.model_hash(),
            "cuts": ",".join(str(b.start) for b in bounds[1:]),
            "round_to": round_to,
            "threads": 1,
            "batch": 1,
            "repeats": repeats,
            "versions": {"torch": str(torch.__version__), "python": platform.python_version()},
            "machine": platform.machine(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpus": os.cpu_count(),
            "load_average_1m": {"before": load_before, "after": os.getloadavg()[0]},
        }
    )
    return report


def _report(
    slices: Sequence[PrunableSlice],
    node: list[list[dict[str, list[float]]]],
    build: dict[str, Any],
    switch: dict[str, Any],
) -> dict[str, Any]:
    ratios = list(slices[0].ratios)
    rows: list[dict[str, Any]] = []
    for i, s in enumerate(slices):
        base = statistics.median(node[0][i]["node"])
        for level, v in enumerate(s.variants):
            med = statistics.median(node[level][i]["node"])
            body = statistics.median(node[level][i]["body"])
            mac_red = s.variants[0].macs / v.macs
            rows.append(
                {
                    "slice": i,
                    "blocks": "+".join(s.model_slice.block_names),
                    "level": level,
                    "ratio": v.ratio,
                    "in_kept": len(v.in_channels)
                    if v.in_channels is not None
                    else s.model_slice.in_channels,
                    "out_kept": len(v.out_channels)
                    if v.out_channels is not None
                    else s.model_slice.out_channels,
                    "macs": v.macs,
                    "params": v.params,
                    "mac_reduction": mac_red,
                    "median_ms": med * 1e3,
                    "p90_ms": _pct(node[level][i]["node"], 90) * 1e3,
                    "body_ms": body * 1e3,
                    "overhead_ms": (med - body) * 1e3,
                    "speedup": base / med,
                    "speedup_over_mac": base / med / mac_red,
                    "build_ms": v.build_s * 1e3,
                }
            )
    whole: list[dict[str, Any]] = []
    for level, ratio in enumerate(ratios):
        total = {
            k: sum(r[k] for r in rows if r["level"] == level)
            for k in ("macs", "median_ms", "body_ms", "overhead_ms")
        }
        mac_red = whole[0]["macs"] / total["macs"] if whole else 1.0
        speedup = whole[0]["median_ms"] / total["median_ms"] if whole else 1.0
        whole.append(
            {
                "level": level,
                "ratio": ratio,
                **total,
                "mac_reduction": mac_red,
                "speedup": speedup,
                "speedup_over_mac": speedup / mac_red,
            }
        )
    fits = [_fit([r for r in rows if r["slice"] == i]) for i in range(len(slices))]
    head = min(whole, key=lambda w: abs(w["ratio"] - HEADLINE_RATIO))
    no_bn, with_bn = build["no_bn_s"], build["with_bn_s"]
    startup = {
        "warmup_s": build["warmup_s"],
        "bn_reestimated": build["bn_reestimated"],
        "per_slice_no_bn_s": no_bn,
        "per_slice_with_bn_s": with_bn,
        "total_no_bn_s": sum(no_bn),
        "total_with_bn_s": sum(with_bn) if with_bn else None,
        "variant_build_ms_median": statistics.median(r["build_ms"] for r in rows),
        "variant_build_ms_max": max(r["build_ms"] for r in rows),
    }
    switch_ms = switch["set_level_ms"]
    rebuild_ms = sum(
        min(r["build_ms"] for r in rows if r["slice"] == i) for i in range(len(slices))
    )
    # a p90 over twice the median: preempted in more than 10% of calls (a busy machine)
    noisy = [f"{r['blocks']}@{r['ratio']:g}" for r in rows if r["p90_ms"] > 2 * r["median_ms"]]
    return {
        "noisy_rows": noisy,
        f"speedup_at_{HEADLINE_RATIO}": head["speedup"],
        f"mac_reduction_at_{HEADLINE_RATIO}": head["mac_reduction"],
        f"speedup_over_mac_at_{HEADLINE_RATIO}": head["speedup_over_mac"],
        "switch_ms": switch_ms,
        "goal_met": {
            "speedup_at_0.3_ge_0.8x_mac_reduction": head["speedup"]
            >= SPEEDUP_GOAL * head["mac_reduction"],
            "switch_le_1ms": switch_ms <= SWITCH_GOAL_MS,
            # a rebuild on switch would add at least the cheapest build of every slice
            "no_rebuild_on_switch": switch["first_output_extra_ms"] < 0.5 * rebuild_ms,
        },
        "goals": {
            "speedup_over_mac": SPEEDUP_GOAL,
            "switch_ms": SWITCH_GOAL_MS,
            "paper_prune_step_ms": PAPER_PRUNE_STEP_MS,
            "headline_ratio": head["ratio"],
            "cheapest_rebuild_ms": rebuild_ms,
        },
        "ratios": ratios,
        "slices": rows,
        "whole": whole,
        "startup": startup,
        "switch": switch,
        "latency_fit": {"per_slice": fits, "whole": _fit(whole)},
    }


def _fit(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Least squares median_ms = ms_per_mmac x MACs / 1e6 + fixed_ms over the levels.

    ``fixed_ms`` is what does not shrink with the MACs (per-call framework cost, elementwise
    ops, channel bookkeeping); it is why a measured speedup trails the MAC reduction.
    """
    import numpy as np

    m = np.array([r["macs"] for r in rows], dtype=float) / 1e6
    t = np.array([r["median_ms"] for r in rows], dtype=float)
    slope, fixed = np.polyfit(m, t, 1)
    r2 = float(np.corrcoef(m, t)[0, 1] ** 2) if len(t) > 2 else 1.0
    return {
        "ms_per_mmac": float(slope),
        "fixed_ms": float(fixed),
        "fixed_share_at_level0": float(fixed / t[0]) if t[0] else 0.0,
        "r2": r2,
    }


def run(args: argparse.Namespace) -> BenchReport:
    import json

    report = measure(
        args.checkpoint,
        args.cuts,
        args.repeats,
        args.switch_runs,
        args.switch_trials,
        args.round_to,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    json_path = args.out.with_suffix(".json")
    png_path = plot(report, args.out.with_suffix(".png"))
    report["files"] = {"json": str(json_path), "png": str(png_path)}
    json_path.write_text(json.dumps(report, indent=2))
    return BenchReport(report, render(report), goals(report))


def goals(report: dict[str, Any]) -> tuple[Goal, ...]:
    """The figures ``GOALS`` name, as measured."""
    return tuple(spec.measured(report[spec.figure]) for spec in GOALS)


def render(report: dict[str, Any]) -> str:
    """The readable tables and the headline."""
    r0 = report["goals"]["headline_ratio"]
    lines = [
        f"bench prune: {report['model']} ({report['checkpoint']}), cuts "
        f"{report['cuts'] or '-'}, 1 thread, batch 1, median of {report['repeats']} "
        f"interleaved runs ({report['cpu_capability']}, load average "
        f"{report['load_average_1m']['before']:.1f} on {report['cpus']} CPUs)",
        "ms: the slice as a node runs it; body ms: the pruned body alone; overhead: the "
        "difference (scatter to full width, channel gather, call wrapper)",
        "",
    ]
    keys = [
        "blocks",
        "level",
        "ratio",
        "in_kept",
        "out_kept",
        "macs",
        "mac_reduction",
        "median_ms",
        "p90_ms",
        "body_ms",
        "overhead_ms",
        "speedup",
        "speedup_over_mac",
        "build_ms",
    ]
    lines.append(
        format_table(
            [
                "slice",
                "lvl",
                "ratio",
                "in",
                "out",
                "MACs",
                "MAC red.",
                "ms",
                "p90 ms",
                "body ms",
                "overhead ms",
                "speedup",
                "speedup/MAC red.",
                "build ms",
            ],
            [[r[k] for k in keys] for r in report["slices"]],
        )
    )
    wkeys = [
        "level",
        "ratio",
        "macs",
        "mac_reduction",
        "median_ms",
        "body_ms",
        "overhead_ms",
        "speedup",
        "speedup_over_mac",
    ]
    lines += [
        "",
        "whole model (sum over the slices, every slice at the level):",
        format_table(
            [
                "lvl",
                "ratio",
                "MACs",
                "MAC red.",
                "ms",
                "body ms",
                "overhead ms",
                "speedup",
                "speedup/MAC red.",
            ],
            [[w[k] for k in wkeys] for w in report["whole"]],
        ),
    ]
    st, sw = report["startup"], report["switch"]
    with_bn = (
        f"{st['total_with_bn_s']:.2f} s with BN re-estimation"
        if st["total_with_bn_s"] is not None
        else "no calibration images: no BN"
    )
    lines += [
        "",
        f"start-up: every level of every slice built in {st['total_no_bn_s']:.2f} s "
        f"without, {with_bn} (+{st['warmup_s']:.2f} s one-time warm-up); one variant: "
        f"median {st['variant_build_ms_median']:.1f} ms, max "
        f"{st['variant_build_ms_max']:.1f} ms",
        f"switch: set_level median {sw['set_level_ms'] * 1e3:.2f} us (p99 "
        f"{sw['set_level_p99_ms'] * 1e3:.2f} us, the timer itself "
        f"{sw['timer_overhead_ms'] * 1e3:.2f} us) over {sw['set_level_calls']} calls; "
        f"the paper's pruning step takes {PAPER_PRUNE_STEP_MS:.0f} ms on a Pi 4B",
        f"first output after a switch, summed over the slices: median "
        f"{sw['first_output_ms']:.3f} ms vs the next forward {sw['next_output_ms']:.3f} "
        f"ms: {sw['first_output_extra_ms']:+.3f} ms ({sw['same_level_extra_ms']:+.3f} ms "
        f"without a change of level)",
        "",
    ]
    fit = report["latency_fit"]["whole"]
    lines += [
        f"latency fit over the levels (whole model): {fit['ms_per_mmac'] * 1e3:.2f} us per "
        f"MMAC + {fit['fixed_ms']:.3f} ms that does not shrink with the MACs "
        f"({100 * fit['fixed_share_at_level0']:.0f}% of level 0, r2 {fit['r2']:.3f})",
        "",
    ]
    sp, mr = report[f"speedup_at_{HEADLINE_RATIO}"], report[f"mac_reduction_at_{HEADLINE_RATIO}"]
    ok = report["goal_met"]
    if report["noisy_rows"]:
        lines += [
            f"WARNING: p90 > 2 x median in {len(report['noisy_rows'])} of "
            f"{len(report['slices'])} rows: the machine was busy, medians may be off",
            "",
        ]
    lines += [
        f"whole model at ratio {r0:g}: speedup {sp:.2f}x vs MAC reduction {mr:.2f}x -> "
        f"{sp / mr:.2f} of it",
        f"switch {report['switch_ms'] * 1e3:.2f} us",
        f"no rebuild on switch (first output {sw['first_output_extra_ms']:+.3f} ms vs a "
        f"rebuild's >= {report['goals']['cheapest_rebuild_ms']:.0f} ms): "
        f"{'yes' if ok['no_rebuild_on_switch'] else 'NO'}",
        f"wrote {report['files']['json']} and {report['files']['png']}",
    ]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> Path:
    """Left: speedup vs MAC reduction per level, one line per slice and the whole model.
    Right: latency per level, stacked by slice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.8))
    top = max(max(r["mac_reduction"], r["speedup"]) for r in report["slices"])
    grid = [1.0, top * 1.05]
    ax.plot(grid, grid, color="grey", lw=0.8, label="speedup = MAC reduction")
    ax.plot(
        grid,
        [SPEEDUP_GOAL * g for g in grid],
        color="grey",
        lw=0.8,
        ls="--",
        label=f"goal: {SPEEDUP_GOAL} x MAC reduction",
    )
    names = sorted({(r["slice"], r["blocks"]) for r in report["slices"]})
    for i, name in names:
        mine = [r for r in report["slices"] if r["slice"] == i]
        ax.plot(
            [r["mac_reduction"] for r in mine],
            [r["speedup"] for r in mine],
            "o-",
            ms=4,
            alpha=0.7,
            label=f"slice {i} ({name})",
        )
    whole = report["whole"]
    ax.plot(
        [w["mac_reduction"] for w in whole],
        [w["speedup"] for w in whole],
        "s-",
        lw=2.5,
        color="black",
        label="whole model",
    )
    body = [whole[0]["body_ms"] / w["body_ms"] for w in whole]
    ax.plot(
        [w["mac_reduction"] for w in whole],
        body,
        "s:",
        color="black",
        alpha=0.5,
        label="whole model, bodies only (no bookkeeping)",
    )
    for w in whole:
        ax.annotate(
            f"{w['ratio']:g}",
            (w["mac_reduction"], w["speedup"]),
            textcoords="offset points",
            xytext=(5, -10),
            fontsize=8,
        )
    ax.set_xlabel("MAC reduction (MACs at level 0 / MACs at the level)")
    ax.set_ylabel("measured speedup (median latency at level 0 / at the level)")
    ax.set_title(
        "Pruned slices: measured speedup vs MAC reduction (1 thread, batch 1)", fontsize=10
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    levels = [f"{w['ratio']:g}" for w in whole]
    bottom = [0.0] * len(whole)
    for i, name in names:
        mine = sorted((r for r in report["slices"] if r["slice"] == i), key=lambda r: r["level"])
        heights = [r["median_ms"] for r in mine]
        bx.bar(levels, heights, bottom=bottom, label=f"slice {i} ({name})")
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    bx.set_xlabel("pruning ratio (every slice)")
    bx.set_ylabel("median latency (ms)")
    bx.set_title(
        f"Latency per level; switch {report['switch_ms'] * 1e3:.1f} us, "
        f"paper's pruning step {PAPER_PRUNE_STEP_MS:.0f} ms",
        fontsize=10,
    )
    bx.grid(alpha=0.3, axis="y")
    bx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
