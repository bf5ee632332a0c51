"""`edgeprune partition`: place a profiled model's blocks on the devices of a device file
(JSON plan, table, PNG; optionally published retained on control/plan)."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from edgeprune.commands._common import (
    add_json,
    add_mqtt,
    format_table,
    mqtt_settings,
    pipe_name,
    print_json,
)

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "partition",
        help="place model blocks on devices (min bottleneck), optionally publish",
        description="Cut a profiled model into contiguous stages on the devices of a TOML "
        "device file (used in file order, some possibly unused) so that the slowest stage is "
        "as fast as possible, then the end-to-end time as small as possible (exact dynamic "
        "programme). A stage costs its blocks' profiled time / device speed (or the device's "
        "own profile) plus sending its output over the device's link. Writes the plan JSON "
        "and a PNG, prints the stages, the bottleneck and the equivalent --cuts. With "
        "--publish the plan goes retained to edgeprune/<pipe>/control/plan, where nodes find "
        "their slice by node id = device name.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=Path("runs/profile.json"),
        help="profile JSON from `edgeprune profile`",
    )
    parser.add_argument(
        "--devices", type=Path, required=True, help="device file, e.g. devices/two-pi4.toml"
    )
    parser.add_argument(
        "--max-stages",
        type=int,
        default=None,
        help="at most this many stages (default: one per device)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("runs/plan.json"),
        help="plan JSON; the plot goes next to it as .png",
    )
    parser.add_argument(
        "--publish",
        action="store_true",
        help="publish the plan retained on edgeprune/<pipe>/control/plan",
    )
    parser.add_argument(
        "--plan-version",
        type=int,
        default=None,
        help="plan version (default: the retained plan's + 1 when publishing, "
        "else 1); nodes ignore plans not newer than the one they run",
    )
    add_mqtt(parser)
    add_json(parser)
    parser.set_defaults(func=run)


@dataclass(frozen=True)
class StageCost:
    """The predicted cost of one stage of a plan, split into its parts."""

    stage: int
    start: int
    end: int
    device: str
    compute_s: float
    transfer_s: float
    memory_bytes: int
    device_memory_bytes: float

    @property
    def total_s(self) -> float:
        return self.compute_s + self.transfer_s


def stage_costs(plan: Any, blocks: Any, devices: Any) -> list[StageCost]:
    """Compute and transfer time and memory of every stage (the partitioner's cost model)."""
    by_name = {d.name: d for d in devices}
    n = len(blocks)
    names, times = [b.name for b in blocks], [b.compute_s for b in blocks]
    out = []
    for k, s in enumerate(plan.placement.stages):
        dev = by_name[s.node]
        start, end = s.bounds.start, s.bounds.end
        part = blocks[start:end]
        compute = sum(b.compute_s for b in part) / dev.relative_speed(names, times)
        transfer = dev.transfer_s(part[-1].output_bytes) if end < n else 0.0
        memory = sum(b.param_bytes for b in part) + max(b.activation_bytes for b in part)
        out.append(
            StageCost(
                k,
                start,
                end,
                s.node,
                compute,
                transfer,
                int(memory),
                dev.memory_bytes,
            )
        )
    return out


def cuts_of(plan: Any) -> str:
    """The ``--cuts`` string of a plan's stage bounds ('' for a single stage)."""
    return ",".join(str(b.start) for b in plan.placement.bounds[1:])


def run(args: argparse.Namespace) -> int:
    from pipeline.devices import load_devices
    from pipeline.partition import partition
    from pipeline.profiling import load_profile, now_iso

    prof = load_profile(args.profile)
    devices = load_devices(args.devices)
    plan = partition(prof.blocks, devices, args.max_stages, version=args.plan_version or 1)
    published = None
    if args.publish:
        settings, pipe = mqtt_settings(args), pipe_name(args)
        plan, topic = publish_plan(settings, pipe, plan, args.plan_version)
        published = {"topic": topic, "broker": settings.url, "version": plan.version}
        log.info("published plan v%d on %s", plan.version, topic)
    costs = stage_costs(plan, prof.blocks, devices)
    doc: dict[str, Any] = {
        **plan.to_dict(),
        "cuts": cuts_of(plan),
        "created": now_iso(),
        "block_names": prof.block_names,
        "profile": {
            "path": str(args.profile),
            "model": prof.model_name,
            "model_hash": prof.model_hash,
            "machine": prof.machine.get("processor"),
        },
        "device_file": str(args.devices),
        "devices": [
            {
                **dev.to_dict(),
                "speed_used": dev.relative_speed(prof.block_names, prof.block_times),
                "speed_from": dev.describe(),
            }
            for dev in devices
        ],
        "stage_costs": [
            {
                "stage": c.stage,
                "compute_s": c.compute_s,
                "transfer_s": c.transfer_s,
                "memory_bytes": c.memory_bytes,
            }
            for c in costs
        ],
        "published": published,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    png = plot_plan(costs, plan, prof.block_names, args.out.with_suffix(".png"))
    if args.json:
        print_json({**doc, "files": {"json": args.out, "png": png}})
        return 0
    names = prof.block_names
    worst = max(costs, key=lambda c: c.total_s)
    rows = [
        [
            c.stage,
            f"[{c.start},{c.end}) {','.join(names[c.start : c.end])}",
            c.device,
            f"{1e3 * c.compute_s:.3f}",
            f"{1e3 * c.transfer_s:.3f}",
            f"{1e3 * c.total_s:.3f}",
            f"{c.memory_bytes / 2**20:.2f} / {c.device_memory_bytes / 2**20:.0f}",
            "<- bottleneck" if c is worst else "",
        ]
        for c in costs
    ]
    print(
        f"{prof.model_name} on {args.devices} (profiled on {prof.machine.get('processor')}; "
        "device times are predictions)"
    )
    print(
        format_table(
            [
                "stage",
                "blocks",
                "device",
                "compute ms",
                "transfer ms",
                "total ms",
                "memory MiB",
                "",
            ],
            rows,
        )
    )
    print(
        f"bottleneck: stage {worst.stage} on {worst.device}, {1e3 * worst.total_s:.3f} ms "
        f"-> at most {1 / worst.total_s:.1f} images/s; end to end "
        f"{1e3 * sum(c.total_s for c in costs):.3f} ms (no queueing)"
    )
    unused = [d.name for d in devices if d.name not in plan.placement.nodes]
    if unused:
        print(f"unused devices: {', '.join(unused)}")
    print(f"equivalent cuts: --cuts {cuts_of(plan) or '(none: one stage)'}")
    for c in costs:
        print(
            f"  edgeprune node --node-id {c.device} --stage {c.stage} --start {c.start} "
            f"--end {c.end}"
        )
    if published:
        print(
            f"published plan v{plan.version} retained on {published['topic']} "
            f"({published['broker']})"
        )
    print(f"wrote {args.out} and {png}")
    return 0


def publish_plan(
    settings: Any, pipe: str, plan: Any, version: int | None, timeout_s: float = 1.0
) -> tuple[Any, str]:
    """Publish ``plan`` retained on the pipe's plan topic; returns (plan as published, topic).

    ``version=None`` reads the retained plan first (waiting up to ``timeout_s``) and uses its
    version + 1, so running nodes accept the new plan.
    """
    import asyncio

    from bus.plan_message import PlanMessage
    from bus.session import Session
    from bus.topics import Topics
    from pipeline.errors import BrokerError, BusError, CodecError

    topic = Topics(pipe).plan

    async def retained_version(session: Session) -> int:
        payload = await session.retained(topic, timeout_s)
        if not payload:
            return 0
        try:
            return PlanMessage.from_json(payload).version
        except CodecError as exc:
            log.warning("ignoring the malformed retained plan: %s", exc)
            return 0

    async def main() -> Any:
        async with Session(settings, name="partition") as session:
            await session.wait_connected(max(timeout_s, 10.0))
            final = (
                plan
                if version is not None
                else replace(plan, version=await retained_version(session) + 1)
            )
            message = PlanMessage(
                final.version,
                final.placement,
                reason=f"edgeprune partition ({final.created_by})",
            )
            await session.publish(topic, message.to_json(), qos=1, retain=True)
            return final

    try:
        return asyncio.run(main()), topic
    except BusError as exc:
        raise BrokerError(f"cannot publish the plan to {settings.url}: {exc}") from exc


def plot_plan(costs: list[StageCost], plan: Any, names: list[str], path: Path) -> Path:
    """Stacked bars of each stage's predicted compute and transfer time, bottleneck marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 1.6 + 0.7 * len(costs)))
    labels = [
        f"{c.stage}: {c.device}\n[{c.start},{c.end}) {','.join(names[c.start : c.end])}"
        for c in costs
    ]
    y = list(range(len(costs)))
    ax.barh(y, [1e3 * c.compute_s for c in costs], color="tab:blue", label="compute")
    ax.barh(
        y,
        [1e3 * c.transfer_s for c in costs],
        left=[1e3 * c.compute_s for c in costs],
        color="tab:orange",
        label="transfer to next stage",
    )
    if plan.bottleneck_s is not None:
        ax.axvline(
            1e3 * plan.bottleneck_s,
            color="k",
            ls="--",
            lw=0.8,
            label=f"bottleneck {1e3 * plan.bottleneck_s:.2f} ms",
        )
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.35e3 * max(c.total_s for c in costs))
    ax.set_xlabel("predicted time per image (ms)")
    ax.set_title(f"Plan {plan.placement.placement_hash()}: {len(costs)} stage(s)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
