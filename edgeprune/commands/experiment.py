"""`edgeprune experiment`: run a whole scenario from one TOML file, one policy or several."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from edgeprune.commands._common import add_data_dir, add_json, data_dir, format_table, print_json

HONEST_COMPARE = "static:0,static:5,reactive,proactive,oracle"
POLICY_HELP = (
    "static:<level> (every stage held at one level; static = static:0), reactive, proactive, "
    "or oracle (knows the scenario's slowdowns in advance)"
)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "experiment",
        help="run a scenario from a TOML file; --compare policies side by side",
        description="Runs the scenario of CONFIG.toml end to end, every part as a separate "
        "process in its own process group: a fresh Mosquitto, one `edgeprune node` per slice "
        "(emulating its device: constant and transient slowdowns on a clock shared with the "
        "trace replay, optional real CPU hogs), `edgeprune controller` with the chosen policy, "
        "and `edgeprune camera` replaying the trace. The harness records every result, exit, "
        "decision, level and metrics message, shows a status line per second, and writes a "
        "JSON and a Markdown report (SLO attainment, p50/p95/p99 latency, throughput, live "
        "accuracy, prune/restore events, time at each level, what was emulated) and plots "
        "(timeline with levels and slowdown windows, latency CDF). A missing or stale "
        "calibration is measured first. Processes are always cleaned up, also on Ctrl-C. "
        "Shipped scenarios: experiment/scenarios/restore.toml (slowdowns far enough apart that "
        "restoring matters), experiment/scenarios/paper.toml, experiment/scenarios/demo.toml. The honest "
        f"comparison: --compare {HONEST_COMPARE} --repeat 3.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("config", type=Path, metavar="CONFIG.toml", help="the scenario")
    parser.add_argument(
        "--policy",
        default=None,
        metavar="POLICY",
        help=f"run this policy: {POLICY_HELP} (default: [experiment] policy)",
    )
    parser.add_argument(
        "--compare",
        default=None,
        metavar="P1,P2,...",
        help="run these policies one after another on the same trace and seed "
        f"and print them side by side, e.g. {HONEST_COMPARE}",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run every policy N times (interleaved, in a rotated order each time); "
        "report medians and ranges (min-max) of every figure",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=2,
        help="re-run a run whose replay started more than 1 s off the shared "
        "clock (start-up slower than the budget), up to N times",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default runs/experiments/<name>-<time>)",
    )
    g = parser.add_argument_group("shorter runs (override [trace])")
    g.add_argument("--max-images", type=int, default=None, help="stop after N images")
    g.add_argument(
        "--window", default=None, metavar="START:END", help="trace window in trace seconds"
    )
    g.add_argument("--compression", type=float, default=None, help="trace time compression")
    g.add_argument("--quiet", action="store_true", help="no live status lines")
    add_data_dir(parser)
    add_json(parser)
    parser.set_defaults(func=run)


def policies_of(args: argparse.Namespace, default: str) -> list[str]:
    """The policies to run, in order, from --compare or --policy."""
    from controller.config import parse_policy
    from pipeline.errors import ConfigError

    if not args.compare:
        chosen = [(args.policy or default).strip()]
        parse_policy(chosen[0])
        return chosen
    chosen = [p.strip() for p in args.compare.split(",") if p.strip()]
    specs = [parse_policy(p) for p in chosen]  # a bad name: ConfigError naming it
    if not chosen or len(set(specs)) != len(specs):
        raise ConfigError(
            f"--compare takes distinct policies ({POLICY_HELP}), got {args.compare!r}"
        )
    return chosen


def apply_overrides(config: Any, args: argparse.Namespace) -> Any:
    from pipeline.errors import ConfigError

    window = None
    if getattr(args, "window", None):
        try:
            a, b = (float(v) for v in args.window.split(":"))
        except ValueError as exc:
            raise ConfigError(f"--window must be START:END, got {args.window!r}") from exc
        window = (a, b)
    return config.with_trace(
        max_images=getattr(args, "max_images", None),
        window=window,
        compression=getattr(args, "compression", None),
    )


def print_outcome(result: Any, as_json: bool) -> None:
    """The side-by-side table (or the one JSON object) and where the files are."""
    from experiment.report import table_rows

    if as_json:
        print_json(result.compare())
        return
    headers, rows = table_rows(result.reports)
    print()
    print(format_table(headers, rows))
    cmp = result.compare()
    for item in cmp["dominance"]:
        print(f"static wins: {item['text']}")
    for item in cmp["overlaps"]:
        print(f"overlap: {item['text']}")
    if len(result.orders) > 1:
        print("order per repetition: " + "; ".join(", ".join(o) for o in result.orders))
    for policy, speedup in cmp.get("speedup_p95", {}).items():
        gain = cmp["slo_attainment_gain"][policy]
        print(
            f"{policy} vs {cmp['baseline']}: p95 speedup "
            f"{'-' if speedup is None else f'{speedup:.2f}x'}, SLO attainment "
            f"{'-' if gain is None else f'{gain:.2f}x'}"
        )
    print("\nemulated: " + "; ".join(result.config.emulation_summary()))
    print(f"report: {result.report_md} and {result.report_json}")
    for name, path in result.plots.items():
        print(f"plot ({name}): {path}")


def run(args: argparse.Namespace) -> int:
    from experiment.config import load_config
    from experiment.session import default_out_dir, run_session

    config = apply_overrides(load_config(args.config), args)
    policies = policies_of(args, config.policy)
    for policy in policies:  # a static level the scenario does not have: before any work
        config.check_policy(policy)
    out = args.out or default_out_dir(config)
    command = "edgeprune " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    result = run_session(
        config,
        policies,
        out,
        data_dir=data_dir(args),
        progress=not args.quiet,
        command=command,
        log_level=args.log_level,
        repeat=args.repeat,
        retries=args.retries,
    )
    print_outcome(result, args.json)
    return 0 if result.ok else 1
