"""`edgeprune prune-curve`: test accuracy at every pruning level, without fine-tuning."""

from __future__ import annotations

import argparse
import json
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
        "prune-curve",
        help="accuracy at every pruning level (table, JSON, PNG)",
        description="Prune each checkpoint's whole model (or each slice of --cuts, all at the "
        "same ratio) at every level with L1-ranked structured pruning, no fine-tuning, and "
        "report test accuracy: as a table, a JSON file and a PNG plot. Accuracy is shown with "
        "BatchNorm statistics re-estimated per level on the checkpoint's 256 calibration "
        "images (what the nodes do) and, for comparison, without.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_checkpoint(parser, multiple=True)
    add_data_dir(parser)
    parser.add_argument("--ratios", default="0,0.1,0.2,0.3,0.4,0.5", help="pruning ratios")
    parser.add_argument("--cuts", default="", help="cut points, e.g. 2,4 (default: one slice)")
    parser.add_argument("--round-to", type=int, default=8, help="channel rounding multiple")
    parser.add_argument("--split", default="test", choices=["val", "test"])
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("runs/prune-curve"),
        help="output prefix: writes PREFIX.json and PREFIX.png",
    )
    add_json(parser)
    parser.set_defaults(func=run)


def curve(
    ckpt_path: Path | None,
    ratios: tuple[float, ...],
    cuts: str,
    round_to: int,
    data: Path,
    split: str,
) -> dict[str, Any]:
    import torch

    from pipeline.calibration.accuracy import accuracy_at_levels
    from pipeline.checkpoint import load_checkpoint
    from pipeline.data import load_dataset, split_dataset
    from pipeline.reference import ComposedPipeline
    from pipeline.slicing import parse_cuts

    ckpt = load_checkpoint(ckpt_path)
    ds = getattr(split_dataset(load_dataset("animal-mnist", data)), split)
    x, y = ckpt.preprocess(ds.images), torch.from_numpy(ds.labels)
    n_blocks = len(ckpt.build().blocks)
    bounds = parse_cuts(cuts, n_blocks)
    out: dict[str, Any] = {
        "checkpoint": str(ckpt.path),
        "model": ckpt.config.name,
        "split": split,
        "samples": len(ds),
        "cuts": cuts or "",
        "train": ckpt.train.get("config", {}),
    }
    for key, recal in (("accuracy_by_ratio", True), ("accuracy_by_ratio_no_bn", False)):
        pipe = ComposedPipeline(
            ckpt,
            bounds,
            ratios=ratios,
            round_to=round_to,
            recalibrate_bn=recal and ckpt.calibration_images is not None,
        )
        uniform = [(level,) * len(bounds) for level in range(len(ratios))]
        accs = accuracy_at_levels(pipe.slices, uniform, x, y, batch_size=256)
        out[key] = {f"{ratio:g}": acc for ratio, acc in zip(ratios, accs, strict=True)}
    return out


def run(args: argparse.Namespace) -> int:
    ratios = tuple(float(r) for r in args.ratios.split(","))
    paths = args.checkpoints or [None]
    results = [
        curve(p, ratios, args.cuts, args.round_to, data_dir(args), args.split) for p in paths
    ]
    report: dict[str, Any] = {"ratios": list(ratios), "checkpoints": results}
    if len(results) == 1:
        report["accuracy_by_ratio"] = results[0]["accuracy_by_ratio"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    json_path = args.out.with_suffix(".json")
    json_path.write_text(json.dumps(report, indent=2))
    png_path = plot(report, args.out.with_suffix(".png"))
    report["files"] = {"json": str(json_path), "png": str(png_path)}
    if args.json:
        print_json(report)
        return 0
    headers = ["ratio"]
    for r in results:
        name = Path(r["checkpoint"]).stem
        headers += [f"{name}", f"{name} (no BN)"]
    rows = []
    for ratio in ratios:
        key = f"{ratio:g}"
        row: list[Any] = [key]
        for r in results:
            row += [r["accuracy_by_ratio"][key], r["accuracy_by_ratio_no_bn"][key]]
        rows.append(row)
    print(
        f"{args.split} accuracy per pruning ratio (no fine-tuning; BN re-estimated per level "
        "unless marked 'no BN')"
    )
    print(format_table(headers, rows))
    print(f"wrote {json_path} and {png_path}")
    return 0


def plot(report: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in report["checkpoints"]:
        name = Path(r["checkpoint"]).stem
        xs = [float(k) for k in r["accuracy_by_ratio"]]
        (line,) = ax.plot(
            xs,
            [100 * v for v in r["accuracy_by_ratio"].values()],
            "o-",
            label=f"{name}, BN re-estimated",
        )
        ax.plot(
            xs,
            [100 * v for v in r["accuracy_by_ratio_no_bn"].values()],
            "x--",
            color=line.get_color(),
            alpha=0.6,
            label=f"{name}, stored BN",
        )
    ax.axhline(10, color="grey", lw=0.8, ls=":", label="chance (10 classes)")
    ax.set_xlabel("pruning ratio (every prunable layer)")
    ax.set_ylabel(f"{report['checkpoints'][0]['split']} accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Accuracy after structured L1 pruning, no fine-tuning")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
