"""`edgeprune plan`: the SlimEdge planner: partition AND per-slice pruning levels for a device
mix with memory caps, under an accuracy floor; prints the plan, the baselines and the
latency/accuracy Pareto front, and can publish the plan for the nodes."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from edgeprune.commands._common import (
    add_checkpoint,
    add_data_dir,
    add_json,
    add_mqtt,
    data_dir,
    format_table,
    mqtt_settings,
    pipe_name,
    print_json,
)

log = logging.getLogger("edgeprune.plan")


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "plan",
        help="SlimEdge: choose the partition and per-slice pruning levels",
        description="Choose which device runs which contiguous slice at which pruning level so "
        "that the bottleneck stage time (with transfers) is smallest, every slice fits its "
        "device's memory cap (pruning shrinks a slice) and the predicted accuracy stays above "
        "the floor. Uses the measured per-block costs and importance of the checkpoint "
        "(measured once and cached under runs/slimedge/). Exact enumeration up to "
        "--exact-limit configurations, NSGA-II beyond. Device names are node ids.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--devices",
        type=Path,
        required=True,
        help="device file (pipeline/devices.py): one [[device]] per device with name, "
        "speed or profile, memory_mb, bandwidth_mbps, latency_ms, failure_prob",
    )
    add_checkpoint(parser)
    add_data_dir(parser)
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--floor", type=float, default=None, help="accuracy floor (absolute)")
    g.add_argument(
        "--max-drop",
        type=float,
        default=0.02,
        help="accuracy floor = measured unpruned accuracy - this",
    )
    parser.add_argument(
        "--objective",
        choices=["bottleneck", "expected"],
        default="bottleneck",
        help="bottleneck, or the expected bottleneck over single failures",
    )
    parser.add_argument(
        "--slo-ms",
        type=float,
        default=None,
        help="pick the most accurate plan whose objective meets this SLO",
    )
    parser.add_argument("--method", choices=["auto", "exact", "nsga2"], default="auto")
    parser.add_argument(
        "--exact-limit",
        type=int,
        default=200_000,
        help="largest configuration count searched exhaustively",
    )
    parser.add_argument("--max-stages", type=int, default=None)
    parser.add_argument(
        "--recovery-s", type=float, default=3.0, help="stall of one failover (expected objective)"
    )
    parser.add_argument(
        "--measurements",
        type=Path,
        default=None,
        help="measurements JSON (default runs/slimedge/measurements-<model>.json)",
    )
    parser.add_argument("--front", type=int, default=12, help="Pareto points to print")
    veto = parser.add_mutually_exclusive_group()
    veto.add_argument(
        "--veto-margin",
        type=float,
        default=None,
        help="a plan must measure at least floor + this on half a of the validation split "
        "(the measured veto; default: the margin `edgeprune bench planner` chose on the "
        "validation split for the default model)",
    )
    veto.add_argument(
        "--no-veto", action="store_true", help="predicted accuracy only (no measured veto)"
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="measure the chosen plan's real accuracy on the test split; below the floor it "
        "is an error and nothing is published or written",
    )
    parser.add_argument("--out", type=Path, default=None, help="write the plan as JSON")
    parser.add_argument(
        "--publish",
        action="store_true",
        help="publish the plan (retained, next version) and the stage levels",
    )
    add_mqtt(parser)
    add_json(parser)
    parser.set_defaults(func=run)


def _stage_rows(plan: Any, names: list[str]) -> list[list[Any]]:
    return [
        [
            i,
            f"[{s.bounds.start},{s.bounds.end}) {'+'.join(names[s.bounds.start : s.bounds.end])}",
            s.node,
            s.level,
            plan.ratios[i],
            plan.stage_s[i] * 1e3,
            plan.memory_bytes[i] / 2**20,
            plan.cap_bytes[i] / 2**20,
        ]
        for i, s in enumerate(plan.placement.stages)
    ]


def run(args: argparse.Namespace) -> int:
    from controller.slimedge import DEFAULT_VETO_MARGIN, Planner
    from pipeline.calibration.accuracy import MeasuredAccuracy, accuracy_cache, fit_accuracy_model
    from pipeline.calibration.slimedge import SliceBank, load_or_measure, split_halves
    from pipeline.checkpoint import load_checkpoint
    from pipeline.data import load_animal_mnist, split_dataset
    from pipeline.devices import load_devices
    from pipeline.errors import ConfigError

    devices = list(load_devices(args.devices))
    ckpt = load_checkpoint(args.checkpoint)
    splits = split_dataset(load_animal_mnist(data_dir(args)))
    m = load_or_measure(ckpt, splits.val, args.measurements, progress=not args.json)
    accuracy = fit_accuracy_model(m)
    floor = args.floor if args.floor is not None else m.unpruned_accuracy - args.max_drop
    bank = SliceBank(ckpt, m.costs.ratios, int(m.meta.get("round_to", 8)))
    margin = None if args.no_veto else args.veto_margin
    if margin is None and not args.no_veto:
        margin = DEFAULT_VETO_MARGIN
    veto = None
    if margin is not None:
        veto_half = split_halves(splits.val)[0]
        veto = MeasuredAccuracy(bank, veto_half, accuracy_cache(m, veto_half))
    planner = Planner(
        m.costs,
        accuracy,
        exact_limit=args.exact_limit,
        max_stages=args.max_stages,
        recovery_s=args.recovery_s,
        measured=veto,
        measured_margin=margin or 0.0,
    )
    slo = None if args.slo_ms is None else args.slo_ms / 1e3
    result = planner.plan(devices, floor, objective=args.objective, slo_s=slo, method=args.method)
    unpruned = planner.plan(devices, floor, levels=0).best
    uniform = planner.best_uniform(devices, floor)
    if veto is not None:
        veto.save()
    out: dict[str, Any] = {
        "floor": floor,
        "veto": None
        if veto is None
        else {"measured_on": f"{veto.data.name} ({len(veto.data)} images)", "margin": margin},
        "unpruned_accuracy": m.unpruned_accuracy,
        "accuracy_model": {"kappa": accuracy.kappa, **accuracy.validation},
        **result.to_dict(),
        "unpruned": unpruned.to_dict() if unpruned else None,
        "uniform": uniform.to_dict() if uniform else None,
    }
    best = result.best
    if best is None:
        if args.json:
            print_json(out)
        measured = "" if veto is None else f" and measured accuracy >= {floor + margin:.3f}"
        raise ConfigError(
            f"no plan on {[d.name for d in devices]} fits the memory caps with "
            f"predicted accuracy >= {floor:.3f}{measured}"
        )
    if args.verify:
        test = MeasuredAccuracy(bank, splits.test, accuracy_cache(m, splits.test))
        measured_test = test([(b.start, b.end) for b in best.bounds], best.levels)
        test.save()
        out["measured_accuracy_test"] = measured_test
        out["verified"] = measured_test >= floor
        if not out["verified"]:
            if args.json:
                print_json(out)
            raise ConfigError(
                f"the plan (levels {list(best.levels)}) measures {measured_test:.4f} on the "
                f"test split, below the floor {floor:.4f} (predicted {best.accuracy:.4f}): "
                "not published"
            )
    message = best.to_message(1, "edgeprune plan")
    if args.publish:
        version = _publish(args, best)
        message = best.to_message(version, "edgeprune plan")
        out["published_version"] = version
    out["plan_message"] = message.to_json().decode()
    if args.out:
        import json

        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1))
    if args.json:
        print_json(out)
        return 0
    names = list(m.costs.block_names)
    print(
        f"SlimEdge plan ({result.method}, {result.evaluated} of {result.configurations} "
        f"configurations, {result.seconds * 1e3:.0f} ms), floor {floor:.3f}, objective "
        f"{args.objective}"
    )
    print(
        format_table(
            ["stage", "blocks", "device", "level", "ratio", "time ms", "mem MiB", "cap MiB"],
            _stage_rows(best, names),
        )
    )
    print(
        f"bottleneck {best.bottleneck_s * 1e3:.3f} ms, end-to-end {best.total_s * 1e3:.3f} ms,"
        f" objective {best.objective_s * 1e3:.3f} ms, predicted accuracy {best.accuracy:.4f}"
        + (f", measured (test) {out['measured_accuracy_test']:.4f}" if args.verify else "")
    )
    for name, p in (
        ("unpruned (best level-0 partition)", unpruned),
        ("uniform (best level meeting the bounds)", uniform),
    ):
        print(
            f"{name}: "
            + (
                "no plan fits the memory caps"
                if p is None
                else f"bottleneck {p.bottleneck_s * 1e3:.3f} ms (x"
                f"{p.bottleneck_s / best.bottleneck_s:.2f}), levels {list(p.levels)}"
            )
        )
    rows = [
        [
            f"{p.objective_s * 1e3:.3f}",
            f"{p.accuracy:.4f}",
            list(p.levels),
            " ".join(f"[{s.bounds.start},{s.bounds.end})@{s.node}" for s in p.placement.stages),
        ]
        for p in result.front[: args.front]
    ]
    print(f"Pareto front ({len(result.front)} points, fastest first):")
    print(format_table(["objective ms", "accuracy", "levels", "placement"], rows))
    if args.publish:
        print(f"published plan v{out['published_version']} on {pipe_name(args)}")
    return 0


def _publish(args: argparse.Namespace, plan: Any) -> int:
    """Publish ``plan`` with the next version after the retained one; returns the version."""
    import asyncio

    from bus.plan_message import PlanMessage
    from bus.session import Session
    from bus.topics import Topics

    mqtt, topics = mqtt_settings(args), Topics(pipe_name(args))

    async def go() -> int:
        async with Session(mqtt, name="plan") as session:
            await session.wait_connected(10.0)
            retained = await session.retained(topics.plan, 1.0)  # the retained plan, if any
            version = PlanMessage.from_json(retained).version if retained else 0
            message = plan.to_message(version + 1, "edgeprune plan")
            acks = [session.publish(topics.plan, message.to_json(), qos=1, retain=True)]
            for level in plan.level_messages(version + 1, "edgeprune plan"):
                acks.append(
                    session.publish(
                        topics.control_stage(level.stage), level.to_json(), qos=1, retain=True
                    )
                )
            await asyncio.gather(*acks)
            return int(message.version)

    return asyncio.run(go())
