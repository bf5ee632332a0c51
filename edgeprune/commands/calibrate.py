"""`edgeprune calibrate`: measure and fit slice latency and end-to-end accuracy against the
pruning levels (one calibration JSON, a PNG, a summary table)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from edgeprune.commands._common import (
    add_checkpoint,
    add_data_dir,
    add_json,
    data_dir,
    format_table,
    print_json,
)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "calibrate",
        help="fit slice latency and accuracy vs pruning level (calibration file)",
        description="For each slice (from --cuts or a --plan): latency at every pruning level "
        "(real pruned variants with BatchNorm re-estimation, batch 1, one thread, median of "
        "--runs after --warmup), scaled to each device of --devices when given (emulation by "
        "speed scaling, recorded in the file), fitted to t_i(p) = a_i p + b_i. Then end-to-end "
        "accuracy on held-out images over per-slice level vectors (the full grid when it has "
        "at most --grid-limit points, else corners + uniform diagonal + seeded random vectors, "
        "--samples in all), fitted to the scaled logistic a(p). Writes the calibration JSON "
        "the controller loads, a PNG of both fits, and prints a summary.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_checkpoint(parser)
    add_data_dir(parser)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--cuts", default=None, help="cut points, e.g. 2,3 (3 slices)")
    where.add_argument(
        "--plan",
        type=Path,
        default=None,
        help="plan JSON from `edgeprune partition` (its stages and devices)",
    )
    parser.add_argument(
        "--devices",
        type=Path,
        default=None,
        help="device file: scale latencies to the devices (with --cuts: one "
        "device per slice, in order; with --plan: matched by name)",
    )
    parser.add_argument(
        "--nodes",
        default=None,
        help="with --cuts and no --devices: node names per slice "
        "(default n0,n1,...); they enter the plan hash",
    )
    parser.add_argument(
        "--dataset", default="animal-mnist", help="'animal-mnist' or a folder of class sub-folders"
    )
    parser.add_argument(
        "--split",
        default="val",
        choices=["val", "test"],
        help="held-out split to measure accuracy on",
    )
    parser.add_argument(
        "--limit", type=int, default=None, help="use a seeded random subset of this many images"
    )
    parser.add_argument("--ratios", default="0,0.1,0.2,0.3,0.4,0.5", help="pruning levels")
    parser.add_argument("--round-to", type=int, default=8, help="channel rounding multiple")
    parser.add_argument("--runs", type=int, default=200, help="timed calls per slice and level")
    parser.add_argument("--warmup", type=int, default=20, help="untimed calls first")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="latency statistic: wall time, or the timing thread's CPU time "
        "(robust when other processes share this machine)",
    )
    parser.add_argument(
        "--grid-limit",
        type=int,
        default=64,
        help="measure the full level grid when it has at most this many points",
    )
    parser.add_argument(
        "--samples", type=int, default=64, help="level vectors to measure when the grid is larger"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random vectors")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("runs/calibration.json"),
        help="calibration JSON; the plot goes next to it as .png",
    )
    add_json(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.calibration.measure import CalibrationSettings, calibrate, load_plan, load_split
    from pipeline.calibration.plot import plot_calibration
    from pipeline.checkpoint import load_checkpoint
    from pipeline.devices import load_devices
    from pipeline.errors import ConfigError
    from pipeline.slicing import parse_cuts

    try:
        ratios = tuple(float(r) for r in args.ratios.split(","))
    except ValueError as exc:
        raise ConfigError(f"--ratios must be numbers, got {args.ratios!r}") from exc
    settings = CalibrationSettings(
        ratios=ratios,
        round_to=args.round_to,
        runs=args.runs,
        warmup=args.warmup,
        grid_limit=args.grid_limit,
        samples=args.samples,
        seed=args.seed,
        clock=args.clock,
    )
    ckpt = load_checkpoint(args.checkpoint)
    devices = load_devices(args.devices) if args.devices else None
    if args.plan is not None:
        place: dict[str, Any] = {"plan": load_plan(args.plan)}
    else:
        nodes = args.nodes.split(",") if args.nodes else None
        place = {"bounds": parse_cuts(args.cuts, ckpt.build().num_blocks), "nodes": nodes}
    data = load_split(args.dataset, data_dir(args), args.split, args.limit, args.seed)
    cal = calibrate(
        ckpt, data, devices=devices, settings=settings, split=args.split, progress=True, **place
    )
    cal.meta["command"] = {
        "cuts": args.cuts,
        "plan": str(args.plan) if args.plan else None,
        "devices": str(args.devices) if args.devices else None,
    }
    json_path = cal.save(args.out)
    png_path = plot_calibration(cal, args.out.with_suffix(".png"))
    if args.json:
        print_json({**cal.to_dict(), "files": {"json": json_path, "png": png_path}})
        return 0
    print_summary(cal)
    print(f"wrote {json_path} and {png_path}")
    return 0


def print_summary(cal: Any) -> None:
    """The slices' latency fits and the accuracy fit, as a person reads them."""
    meta = cal.meta
    print(f"{meta.get('model')} {cal.model_hash}, plan {cal.plan_hash}; {meta.get('emulation')}")
    rows = []
    for s, dev in zip(cal.slices, meta.get("devices", []), strict=False):
        rows.append(
            [
                s.stage,
                f"[{s.start},{s.end})",
                s.device,
                dev.get("time_factor", 1.0),
                f"{1e3 * s.points[0][1]:.3f}",
                f"{1e3 * s.points[-1][1]:.3f}",
                f"{1e3 * s.fit.a:.3f}",
                f"{1e3 * s.fit.b:.3f}",
                f"{s.fit.r2:.4f}",
            ]
        )
    print(
        format_table(
            [
                "stage",
                "blocks",
                "device",
                "x time",
                "t(0) ms",
                f"t({cal.ratios[-1]:g}) ms",
                "a ms",
                "b ms",
                "R^2",
            ],
            rows,
        )
    )
    fit, check = cal.accuracy_fit, meta.get("accuracy_fit_check", {})
    print(
        f"accuracy ({meta.get('split')} split, {meta.get('samples')} images, "
        f"{meta.get('points')} vectors: {meta.get('selection')}): unpruned "
        f"{cal.unpruned_accuracy:.4f}"
    )
    print(
        f"  fit a(p) = {fit.lo:.3g} + ({fit.hi:.4f} - {fit.lo:.3g}) / (1 + exp(-(g.p - d))), "
        f"g = [{', '.join(f'{g:.3f}' for g in fit.g)}], d = {fit.d:.3f}"
    )
    print(
        f"  max abs error {fit.max_abs_error:.4f}, rmse {check.get('rmse', float('nan')):.4f}; "
        f"near a_min {check.get('a_min')}: max abs error "
        f"{check.get('max_abs_error_near_a_min')}, falsely feasible "
        f"{check.get('falsely_feasible')} of {check.get('points_near_a_min')}"
    )
    lat = meta.get("latency", {})
    if lat.get("busy_ratio", 1.0) > 1.25:
        print(
            f"  warning: this machine was busy (wall time {lat['busy_ratio']:.1f}x CPU time); "
            f"latency clock: {lat.get('clock')}"
        )
    secs = meta.get("seconds", {})
    print("  seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in secs.items()))
