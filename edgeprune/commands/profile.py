"""`edgeprune profile`: per-block time and memory of a model on this machine (JSON, table, PNG)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from edgeprune.commands._common import add_checkpoint, add_json, format_table, print_json


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "profile",
        help="per-block time and memory of a model on this machine",
        description="Time every block of a model (stem, residual blocks, head) at batch 1 on "
        "one thread: the median of --runs calls after --warmup, interleaved across blocks. "
        "Also records parameter bytes, estimated peak activation bytes and output bytes. "
        "Writes a JSON profile (the input of `edgeprune partition`, and of a device file's "
        "`profile = ...` when run on the device itself), prints a table and writes a PNG.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_checkpoint(parser)
    parser.add_argument(
        "--model",
        default=None,
        help="profile a preset with random weights instead of a checkpoint "
        "(e.g. resnet-xs); timing does not depend on the weights",
    )
    parser.add_argument("--runs", type=int, default=200, help="timed calls per block")
    parser.add_argument("--warmup", type=int, default=20, help="untimed calls per block first")
    parser.add_argument("--threads", type=int, default=1, help="torch threads while timing")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="statistic: wall time, or the timing thread's CPU time (robust "
        "on a shared machine; one thread only)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("runs/profile.json"),
        help="profile JSON; the plot goes next to it as .png",
    )
    add_json(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from pipeline.checkpoint import load_checkpoint
    from pipeline.errors import ConfigError
    from pipeline.models import build_model, preset
    from pipeline.profiling import profile_model

    if args.model and args.checkpoint:
        raise ConfigError("give --checkpoint or --model, not both")
    if args.model:
        torch.manual_seed(0)
        model, model_hash, source = build_model(preset(args.model)).eval(), None, None
    else:
        ckpt = load_checkpoint(args.checkpoint)
        model, model_hash, source = ckpt.build(), ckpt.model_hash(), str(ckpt.path)
    prof = profile_model(
        model,
        model_hash=model_hash,
        source=source,
        runs=args.runs,
        warmup=args.warmup,
        threads=args.threads,
        clock=args.clock,
        progress=True,
    )
    json_path = prof.save(args.out)
    png_path = plot_profile(prof, args.out.with_suffix(".png"))
    if args.json:
        print_json({**prof.to_dict(), "files": {"json": json_path, "png": png_path}})
        return 0
    print(
        f"{prof.model_name} ({model_hash or 'random weights'}) on "
        f"{prof.machine.get('processor')}, {args.threads} thread(s), batch 1, median of "
        f"{args.runs} runs"
    )
    print(format_table(*profile_table(prof)))
    print(f"total {1e3 * prof.total_s:.3f} ms per image")
    busy = prof.settings.get("busy_ratio", 1.0)
    if busy > 1.25:
        print(
            f"warning: this machine is busy (wall time {busy:.1f}x CPU time); "
            + (
                "wall-clock times are inflated: rerun when it is quiet or use --clock cpu"
                if args.clock == "wall"
                else "CPU-clock times are used"
            )
        )
    print(f"wrote {json_path} and {png_path}")
    return 0


def profile_table(prof: Any) -> tuple[list[str], list[list[Any]]]:
    """(headers, rows) of a profile for :func:`format_table`."""
    headers = [
        "#",
        "block",
        "in -> out",
        "params",
        "MMACs",
        "time ms",
        "p10-p90 ms",
        "cpu ms",
        "param KiB",
        "act KiB",
        "out KiB",
    ]
    rows = []
    details = {d.name: d for d in prof.details}
    for k, b in enumerate(prof.blocks):
        d = details.get(b.name)
        shape = (
            f"{'x'.join(map(str, d.in_shape))} -> {'x'.join(map(str, d.out_shape))}" if d else ""
        )
        spread = f"{1e3 * d.p10_s:.3f}-{1e3 * d.p90_s:.3f}" if d else ""
        rows.append(
            [
                k,
                b.name,
                shape,
                d.params if d else "",
                d.macs / 1e6 if d else "",
                f"{1e3 * b.compute_s:.3f}",
                spread,
                f"{1e3 * d.cpu_s:.3f}" if d else "",
                b.param_bytes / 1024,
                b.activation_bytes / 1024,
                b.output_bytes / 1024,
            ]
        )
    return headers, rows


def plot_profile(prof: Any, path: Path) -> Path:
    """Bar charts of a profile: time per block, and memory / output bytes per block."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = prof.block_names
    x = np.arange(len(names))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    times = np.array([1e3 * b.compute_s for b in prof.blocks])
    if prof.details:
        lo = times - np.array([1e3 * d.p10_s for d in prof.details])
        hi = np.array([1e3 * d.p90_s for d in prof.details]) - times
        ax1.bar(x, times, yerr=np.clip([lo, hi], 0, None), capsize=3, color="tab:blue")
    else:
        ax1.bar(x, times, color="tab:blue")
    ax1.set(
        xticks=x,
        xticklabels=names,
        ylabel="forward time (ms, batch 1)",
        title=f"{prof.model_name}: time per block (median, p10-p90), "
        f"{prof.settings.get('threads', '?')} thread(s)",
    )
    ax1.grid(axis="y", alpha=0.3)
    w = 0.27
    for k, (key, label) in enumerate(
        (
            ("param_bytes", "parameters"),
            ("activation_bytes", "peak activations (est.)"),
            ("output_bytes", "output (sent on a cut)"),
        )
    ):
        ax2.bar(x + (k - 1) * w, [getattr(b, key) / 1024 for b in prof.blocks], w, label=label)
    ax2.set(
        xticks=x,
        xticklabels=names,
        ylabel="KiB (log scale)",
        yscale="log",
        title="memory per block (float32, batch 1)",
    )
    ax2.grid(axis="y", alpha=0.3)
    ax2.legend(fontsize=8)
    fig.suptitle(f"{prof.machine.get('processor', '?')} — {prof.created}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
