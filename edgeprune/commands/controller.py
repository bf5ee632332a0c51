"""`edgeprune controller`: watch a running pipeline and prune / restore its slices at run time;
with ``--failover``, also re-plan it on the surviving nodes when one is lost (SlimEdge)."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from edgeprune.commands._common import (
    add_checkpoint,
    add_data_dir,
    add_mqtt,
    data_dir,
    mqtt_settings,
    pipe_name,
    run_service,
)

log = logging.getLogger("edgeprune.controller")

# (flag, config key, type, help); the default shown is the config's.
THRESHOLDS: tuple[tuple[str, str, type, str], ...] = (
    ("--margin-ms", "margin_ms", float, "reactive: LAT_trigger = SLO + margin, ms"),
    ("--quantile", "quantile", float, "reactive: latency quantile watched (0.95 = p95)"),
    ("--window", "window_s", float, "sliding window of end-to-end latencies, s"),
    (
        "--sustain",
        "sustain_s",
        float,
        "a prune condition must hold this long, s (default: reactive 5, proactive 1)",
    ),
    ("--cooldown", "cooldown_s", float, "no new action for this long after one, s"),
    (
        "--restore-below-ms",
        "restore_below_ms",
        float,
        "reactive: restore when the quantile stays below this, ms (default: 0.6 x SLO)",
    ),
    (
        "--restore-sustain",
        "restore_sustain_s",
        float,
        "a restore condition must hold this long, s (default: reactive 30, proactive 20)",
    ),
    ("--min-samples", "min_samples", int, "reactive: fewer latencies in the window = no decision"),
    ("--rho-high", "rho_high", float, "proactive: prune when a stage's utilisation exceeds"),
    (
        "--rho-target",
        "rho_target",
        float,
        "utilisation every stage is planned for: capacity target = rho_target / arrival rate",
    ),
    ("--rho-low", "rho_low", float, "proactive: restore when restored levels stay below"),
    ("--rate-tau", "rate_tau_s", float, "time constant of the arrival-rate average, s"),
    ("--metrics-max-age", "metrics_max_age_s", float, "older node metrics count as missing, s"),
    ("--min-arrivals", "min_arrivals", int, "proactive: arrivals needed before deciding"),
    (
        "--escalate-after",
        "escalate_after_s",
        float,
        "proactive: within the cooldown, prune further after this long if the new levels still "
        "cannot carry the load with empty queues, s",
    ),
    (
        "--slowdown-window",
        "slowdown_window_s",
        float,
        "live slowdown: median of the service samples of this window, s",
    ),
    ("--slowdown-tau", "slowdown_tau_s", float, "live slowdown: EWMA time constant, s"),
    ("--slowdown-min", "slowdown_min", float, "live slowdown: lower bound"),
    ("--slowdown-max", "slowdown_max", float, "live slowdown: upper bound"),
    ("--decide-interval", "decide_interval_s", float, "seconds between policy evaluations"),
    (
        "--status-interval",
        "status_interval_s",
        float,
        "seconds between 'observing' INFO lines (0: off)",
    ),
    ("--reconnect-max", "reconnect_max_s", float, "longest reconnect backoff, s"),
)


def _defaults() -> dict[str, Any]:
    from controller.config import ControllerConfig

    return {f.name: f.default for f in fields(ControllerConfig) if f.default is not MISSING}


def register(sub: argparse._SubParsersAction) -> None:
    defaults = _defaults()
    parser = sub.add_parser(
        "controller",
        help="prune slow slices at run time and restore them later",
        description="The controller of one pipeline: subscribes to exits, node metrics and "
        "statuses, and the retained levels on control/stage/+; when the policy triggers, "
        "chooses per-slice pruning levels with the optimizer (calibrated curves x live "
        "slowdowns) and publishes them RETAINED on control/stage/<i>, each decision with its "
        "inputs on control/decisions. Settings: defaults < --config [controller] < flags. "
        "With --failover, it also watches the nodes of the retained plan (control/plan) and, "
        "when one is lost (its Last Will, or no message for --heartbeat-timeout s), re-plans "
        "the pipeline on the survivors with the SlimEdge planner and publishes the new plan "
        "and levels RETAINED; nodes apply it without restarting. "
        "See docs/controller.md and docs/slimedge.md.",
    )
    parser.add_argument(
        "--calibration",
        type=Path,
        required=True,
        help="calibration file (from `edgeprune calibrate`)",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="TOML file with a [controller] table (any key below)",
    )
    parser.add_argument(
        "--slo-ms",
        type=float,
        default=None,
        help="end-to-end latency SLO in ms (required here or in the config)",
    )
    parser.add_argument(
        "--a-min",
        type=float,
        default=None,
        help=f"minimum predicted accuracy (default {defaults['a_min']})",
    )
    parser.add_argument(
        "--policy",
        default=None,
        metavar="POLICY",
        help="reactive: the paper's latency trigger; proactive: queues and "
        "arrival rate, acts before the SLO breaks; static:<level>: every stage held at "
        "that level from the start (static = static:0: observe and log only); oracle: "
        "the optimizer's levels for the slowdowns of --oracle-schedule, set when each "
        f"window starts and ends (experiments) (default {defaults['policy']})",
    )
    parser.add_argument(
        "--oracle-schedule",
        type=Path,
        default=None,
        metavar="SCHEDULE.json",
        help="the oracle policy's known slowdowns and arrival rates per segment of the "
        "experiment clock (`edgeprune experiment` writes it)",
    )
    parser.add_argument(
        "--objective",
        choices=["bottleneck", "sum"],
        default=None,
        help="bottleneck: min max stage time (throughput); sum: the paper's "
        f"min end-to-end time (default {defaults['objective']})",
    )
    parser.add_argument(
        "--report",
        type=Path,
        default=None,
        help="write a JSON summary here on shutdown (decisions, time at each "
        "level per stage, prune/restore counts)",
    )
    g = parser.add_argument_group("thresholds and windows ([controller] keys in brackets)")
    for flag, key, kind, text in THRESHOLDS:
        default = defaults.get(key)
        shown = "" if default is None or "default:" in text else f"; default {default:g}"
        g.add_argument(
            flag,
            dest=key,
            type=kind,
            default=None,
            metavar=kind.__name__.upper(),
            help=f"{text}{shown} [{key}]",
        )
    f = parser.add_argument_group(
        "failover (SlimEdge re-planning when a node is lost; docs/slimedge.md)"
    )
    f.add_argument(
        "--failover",
        type=Path,
        default=None,
        metavar="DEVICES.toml",
        help="enable failover: TOML with one [[device]] per node that may run a "
        "slice (name = node id, speed, memory_mb, bandwidth_mbps, latency_ms, "
        "failure_prob; as `edgeprune plan --devices`). The plan to watch is the "
        "retained control/plan (e.g. from `edgeprune plan --publish`); nodes placed "
        "with --stage/--start/--end are not re-planned",
    )
    f.add_argument(
        "--heartbeat-timeout",
        type=float,
        default=3.0,
        metavar="S",
        help="a node silent this long (no metrics, which nodes send every "
        "--metrics-interval, 1 s by default) is lost; a Last Will is acted on at "
        "once. Detection bound: this + --failover-check-interval (default 3.0)",
    )
    f.add_argument(
        "--failover-check-interval",
        type=float,
        default=0.2,
        metavar="S",
        help="how often liveness is checked, s (default 0.2)",
    )
    f.add_argument(
        "--build-grace",
        type=float,
        default=30.0,
        metavar="S",
        help="after a new plan, its nodes may be silent this long while they build "
        "their slices (a Last Will still counts at once) (default 30)",
    )
    fl = f.add_mutually_exclusive_group()
    fl.add_argument(
        "--failover-floor",
        type=float,
        default=None,
        metavar="ACC",
        help="accuracy floor of the re-plan (absolute, predicted from the measured importance)",
    )
    fl.add_argument(
        "--failover-max-drop",
        type=float,
        default=0.02,
        metavar="ACC",
        help="floor = measured unpruned accuracy - this (default 0.02)",
    )
    f.add_argument(
        "--failover-objective",
        choices=["bottleneck", "expected"],
        default="bottleneck",
        help="planner objective: bottleneck stage time, or its expectation over "
        "further single failures (default bottleneck)",
    )
    f.add_argument(
        "--failover-slo-ms",
        type=float,
        default=None,
        metavar="MS",
        help="re-plan to the most accurate plan whose objective (bottleneck stage "
        "time with transfers) is at most this; default: the fastest plan above "
        "the floor",
    )
    add_checkpoint(
        f,
        help="model checkpoint the nodes run: its measured per-block costs and "
        "importance drive the re-plan",
    )
    f.add_argument(
        "--measurements",
        type=Path,
        default=None,
        help="measurements JSON (default runs/slimedge/measurements-<model>-<hash>"
        ".json; measured once, a few minutes, if missing)",
    )
    add_data_dir(f, help="dataset cache folder, only to measure")
    add_mqtt(parser)
    parser.set_defaults(func=run)


def build_config(args: argparse.Namespace) -> Any:  # -> ControllerConfig
    from controller.config import ControllerConfig

    overrides: dict[str, Any] = {key: getattr(args, key, None) for _, key, _, _ in THRESHOLDS}
    overrides.update(
        slo_ms=args.slo_ms, a_min=args.a_min, policy=args.policy, objective=args.objective
    )
    if args.config:
        return ControllerConfig.from_toml(args.config, **overrides)
    return ControllerConfig.from_mapping({}, **overrides)


def build_failover(args: argparse.Namespace) -> Any:  # -> FailoverMonitor | None
    """The failover monitor of ``--failover`` (None without it): devices, planner on the
    checkpoint's measured costs and importance, floor, detection settings."""
    if args.failover is None:
        return None
    from controller.failover import FailoverMonitor, FailoverSettings
    from controller.slimedge import Planner
    from pipeline.calibration.accuracy import fit_accuracy_model
    from pipeline.calibration.slimedge import default_cache, load_or_measure
    from pipeline.checkpoint import load_checkpoint
    from pipeline.devices import load_devices

    settings = FailoverSettings(
        heartbeat_timeout_s=args.heartbeat_timeout,
        check_interval_s=args.failover_check_interval,
        build_grace_s=args.build_grace,
    )
    devices = list(load_devices(args.failover))
    ckpt = load_checkpoint(args.checkpoint)
    from pipeline.data import load_animal_mnist, split_dataset

    path = args.measurements or default_cache(ckpt)

    def held_out() -> Any:  # loaded only when the measurements must be taken
        log.info(
            "failover: measuring per-block costs and importance of %s (once; cached at %s)",
            ckpt.config.name,
            path,
        )
        return split_dataset(load_animal_mnist(data_dir(args))).val

    m = load_or_measure(ckpt, held_out, path, progress=False)
    floor = (
        args.failover_floor
        if args.failover_floor is not None
        else m.unpruned_accuracy - args.failover_max_drop
    )
    planner = Planner(m.costs, fit_accuracy_model(m))
    slo = None if args.failover_slo_ms is None else args.failover_slo_ms / 1e3
    log.info(
        "failover armed: devices %s, floor %.3f, objective %s%s, detection within "
        "%.1f s of a node's last message (Last Will: at once)",
        [d.name for d in devices],
        floor,
        args.failover_objective,
        "" if slo is None else f", SLO {slo * 1e3:g} ms",
        settings.detection_bound_s,
    )
    return FailoverMonitor(
        planner, devices, floor, settings, objective=args.failover_objective, slo_s=slo
    )


def run(args: argparse.Namespace) -> int:

    from controller.oracle import OracleSchedule
    from controller.service import Controller
    from pipeline.calibration import Calibration

    config = build_config(args)
    calibration = Calibration.load(args.calibration)
    oracle = None if args.oracle_schedule is None else OracleSchedule.load(args.oracle_schedule)
    pipe = pipe_name(args)
    monitor = build_failover(args)
    mqtt = mqtt_settings(args)
    calibrated = [(s.start, s.end) for s in calibration.slices]

    def on_failover(decision: Any) -> None:
        bounds = [(b.start, b.end) for b in decision.message.bounds]
        log.warning(
            "failover: published plan v%d %s on %s at levels %s (%s)",
            decision.message.version,
            bounds,
            decision.message.nodes,
            list(decision.plan.levels),
            decision.message.reason,
        )
        if bounds != calibrated:
            controller.state.hold(
                f"failover plan v{decision.message.version} runs slices "
                f"{bounds}, the calibration is for {calibrated}"
            )

    # failover is a handler on the controller's one connection
    controller = Controller(
        config,
        calibration,
        mqtt,
        pipe=pipe,
        oracle_schedule=oracle,
        failover=monitor,
        on_failover=on_failover,
    )

    async def serve(stop: Any) -> None:
        report = await controller.run(stop)
        if args.report is not None:
            report = {**report, "pipe": pipe, "calibration_path": str(args.calibration)}
            if monitor is not None:
                report["failover"] = [d.to_dict() for d in controller.failover_decisions]
            args.report.parent.mkdir(parents=True, exist_ok=True)
            args.report.write_text(json.dumps(report, indent=1))
            log.info("report written to %s", args.report)

    return run_service(serve)
