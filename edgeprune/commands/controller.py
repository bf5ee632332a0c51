"""`edgeprune controller`: watch a running pipeline and prune / restore its slices at run time."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from edgeprune.commands._common import add_mqtt, mqtt_settings, pipe_name, run_service

log = logging.getLogger("edgeprune.controller")

# (flag, config key, type, help); the default shown is the config's.
THRESHOLDS: tuple[tuple[str, str, type, str], ...] = (
    ("--margin-ms", "margin_ms", float, "reactive: LAT_trigger = SLO + margin, ms"),
    ("--quantile", "quantile", float, "reactive: latency quantile watched (0.95 = p95)"),
    ("--window", "window_s", float, "sliding window of end-to-end latencies, s"),
    ("--sustain", "sustain_s", float,
     "a prune condition must hold this long, s (default: reactive 5, proactive 1)"),
    ("--cooldown", "cooldown_s", float, "no new action for this long after one, s"),
    ("--restore-below-ms", "restore_below_ms", float,
     "reactive: restore when the quantile stays below this, ms (default: 0.6 x SLO)"),
    ("--restore-sustain", "restore_sustain_s", float,
     "a restore condition must hold this long, s (default: reactive 30, proactive 20)"),
    ("--min-samples", "min_samples", int, "reactive: fewer latencies in the window = no "
     "decision"),
    ("--rho-high", "rho_high", float, "proactive: prune when a stage's utilisation exceeds"),
    ("--rho-target", "rho_target", float,
     "utilisation every stage is planned for: capacity target = rho_target / arrival rate"),
    ("--rho-low", "rho_low", float, "proactive: restore when restored levels stay below"),
    ("--rate-tau", "rate_tau_s", float, "time constant of the arrival-rate average, s"),
    ("--metrics-max-age", "metrics_max_age_s", float, "older node metrics count as missing, s"),
    ("--min-arrivals", "min_arrivals", int, "proactive: arrivals needed before deciding"),
    ("--slowdown-window", "slowdown_window_s", float,
     "live slowdown: median of the service samples of this window, s"),
    ("--slowdown-tau", "slowdown_tau_s", float, "live slowdown: EWMA time constant, s"),
    ("--slowdown-min", "slowdown_min", float, "live slowdown: lower bound"),
    ("--slowdown-max", "slowdown_max", float, "live slowdown: upper bound"),
    ("--decide-interval", "decide_interval_s", float, "seconds between policy evaluations"),
    ("--status-interval", "status_interval_s", float,
     "seconds between 'observing' INFO lines (0: off)"),
    ("--reconnect-max", "reconnect_max_s", float, "longest reconnect backoff, s"),
)


def _defaults() -> dict[str, Any]:
    from controller.config import ControllerConfig

    return {f.name: f.default for f in fields(ControllerConfig) if f.default is not MISSING}


def register(sub: argparse._SubParsersAction) -> None:
    defaults = _defaults()
    parser = sub.add_parser(
        "controller", help="prune slow slices at run time and restore them later",
        description="The controller of one pipeline: subscribes to exits, node metrics and "
        "statuses, and the retained levels on control/stage/+; when the policy triggers, "
        "chooses per-slice pruning levels with the optimizer (calibrated curves x live "
        "slowdowns) and publishes them RETAINED on control/stage/<i>, each decision with its "
        "inputs on control/decisions. Settings: defaults < --config [controller] < flags. "
        "See docs/controller.md.")
    parser.add_argument("--calibration", type=Path, required=True,
                        help="calibration file (from `edgeprune calibrate`)")
    parser.add_argument("--config", type=Path, default=None,
                        help="TOML file with a [controller] table (any key below)")
    parser.add_argument("--slo-ms", type=float, default=None,
                        help="end-to-end latency SLO in ms (required here or in the config)")
    parser.add_argument("--a-min", type=float, default=None,
                        help=f"minimum predicted accuracy (default {defaults['a_min']})")
    parser.add_argument("--policy", choices=["reactive", "proactive", "static"], default=None,
                        help="reactive: the paper's latency trigger; proactive: queues and "
                        "arrival rate, acts before the SLO breaks; static: observe and log "
                        f"only (default {defaults['policy']})")
    parser.add_argument("--objective", choices=["bottleneck", "sum"], default=None,
                        help="bottleneck: min max stage time (throughput); sum: the paper's "
                        f"min end-to-end time (default {defaults['objective']})")
    parser.add_argument("--report", type=Path, default=None,
                        help="write a JSON summary here on shutdown (decisions, time at each "
                        "level per stage, prune/restore counts)")
    g = parser.add_argument_group("thresholds and windows ([controller] keys in brackets)")
    for flag, key, kind, text in THRESHOLDS:
        default = defaults.get(key)
        shown = "" if default is None or "default:" in text else f"; default {default:g}"
        g.add_argument(flag, dest=key, type=kind, default=None, metavar=kind.__name__.upper(),
                       help=f"{text}{shown} [{key}]")
    add_mqtt(parser)
    parser.set_defaults(func=run)


def build_config(args: argparse.Namespace) -> Any:  # -> ControllerConfig
    from controller.config import ControllerConfig

    overrides: dict[str, Any] = {key: getattr(args, key, None) for _, key, _, _ in THRESHOLDS}
    overrides.update(slo_ms=args.slo_ms, a_min=args.a_min, policy=args.policy,
                     objective=args.objective)
    if args.config:
        return ControllerConfig.from_toml(args.config, **overrides)
    return ControllerConfig.from_mapping({}, **overrides)


def run(args: argparse.Namespace) -> int:
    from controller.service import Controller
    from pipeline.calibration import Calibration

    config = build_config(args)
    calibration = Calibration.load(args.calibration)
    pipe = pipe_name(args)
    controller = Controller(config, calibration, mqtt_settings(args), pipe=pipe)

    async def serve(stop: Any) -> None:
        report = await controller.run(stop)
        if args.report is not None:
            report = {**report, "pipe": pipe, "calibration_path": str(args.calibration)}
            args.report.parent.mkdir(parents=True, exist_ok=True)
            args.report.write_text(json.dumps(report, indent=1))
            log.info("report written to %s", args.report)

    return run_service(serve)
