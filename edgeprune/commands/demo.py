"""`edgeprune demo`: the whole system on one machine, five policies, in about eight minutes."""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import time
from pathlib import Path

from edgeprune.commands._common import add_data_dir, add_json, data_dir
from experiment import SCENARIOS_DIR

log = logging.getLogger("edgeprune.demo")

DEMO_CONFIG = SCENARIOS_DIR / "demo.toml"
QUICK_CHECKPOINT = Path("runs") / "demo" / "quick-resnet-s.pt"


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "demo",
        help="the whole system live: slow a board down, watch the controller prune",
        description="Runs experiment/scenarios/demo.toml end to end: a local Mosquitto, two slice "
        "nodes emulating Raspberry-Pi-class boards (the second 14% slower, each a separate "
        "process), the controller and a camera replaying a compressed real camera-trap trace "
        "(Orinoquía, the first 45 s of one day at 40x). Midway one board is slowed down 5x for "
        "17 s (emulated honestly: the real computation, then a wait of (k - 1) times it). It "
        "runs the trace five times, the honest comparison: `static:0` (never pruned), "
        "`static:5` (pruned to the deepest level once and for all), `reactive` (the paper's "
        "controller: acts when the p95 latency stays above the SLO), `proactive` (acts on "
        "queue depths, service times and the arrival rate before the SLO breaks) and "
        "`oracle` (knows the slowdown window in advance: the limit a controller can reach), "
        "and shows once a second the levels of every stage, the latency and the "
        "SLO attainment so far; level changes get their own line with the controller's "
        "reason. At the end: a side-by-side table (SLO attainment, attainment vs the oracle, "
        "p50/p95/p99 latency, throughput, live accuracy, prune/restore events), whether a "
        "static level beats a controller on both SLO attainment and accuracy, and the paths "
        "of the report and plots (latency over time with the levels and the slowdown window "
        "shaded; the latency CDF; SLO attainment vs accuracy). About eight minutes on two cores "
        "(--compare static:0,proactive: under three); a missing calibration is measured first "
        "(about 15 s), a missing model is trained quickly (a few minutes).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=DEMO_CONFIG,
        help="the scenario (a TOML file like experiment/scenarios/*.toml)",
    )
    parser.add_argument(
        "--compare",
        default=None,
        metavar="P1,P2,...",
        help="policies to run one after another (default: the honest comparison "
        "static:0,static:<deepest level>,reactive,proactive,oracle)",
    )
    parser.add_argument(
        "--policy",
        default=None,
        metavar="POLICY",
        help="run only this policy (faster; overrides --compare): static:<level>, reactive, "
        "proactive or oracle",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default runs/experiments/demo-<time>)",
    )
    add_data_dir(parser)
    add_json(parser)
    parser.set_defaults(func=run)


def honest_compare(n_levels: int) -> str:
    """No pruning, the deepest level, both controllers, and the oracle."""
    return f"static:0,static:{n_levels - 1},reactive,proactive,oracle"


def quick_checkpoint(args: argparse.Namespace) -> Path:
    """Train a small model for the demo (standard regime, 3 epochs) when none exists."""
    if QUICK_CHECKPOINT.is_file():
        return QUICK_CHECKPOINT
    print(
        "no trained model found: training a quick one for the demo (3 epochs; "
        "`edgeprune train` makes the real one) ...",
        file=sys.stderr,
        flush=True,
    )
    cmd = [
        sys.executable,
        "-m",
        "edgeprune",
        "train",
        "--regime",
        "standard",
        "--epochs",
        "3",
        "--out",
        str(QUICK_CHECKPOINT),
    ]
    if args.data_dir:
        cmd += ["--data-dir", str(args.data_dir)]
    subprocess.run(cmd, check=True)
    return QUICK_CHECKPOINT


def run(args: argparse.Namespace) -> int:
    from edgeprune.commands.experiment import policies_of, print_outcome
    from experiment.calibration import checkpoint_path
    from experiment.config import load_config
    from experiment.session import run_session

    started = time.monotonic()
    config = load_config(args.config)
    if not checkpoint_path(config).is_file():
        config = config.with_overrides(
            checkpoint=quick_checkpoint(args), calibration=Path("runs/calibration/demo-quick.json")
        )
    if not args.policy and not args.compare:
        args.compare = honest_compare(config.n_levels)
    policies = policies_of(args, config.policy)
    for policy in policies:
        config.check_policy(policy)
    out = args.out or Path("runs") / "experiments" / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    print(
        f"edgeprune demo: {config.description}\npolicies: {', '.join(policies)}; output: {out}\n",
        file=sys.stderr,
        flush=True,
    )
    result = run_session(
        config,
        policies,
        out,
        data_dir=data_dir(args),
        progress=True,
        command="edgeprune demo",
        log_level=args.log_level,
    )
    print_outcome(result, args.json)
    if not args.json:
        print(f"\ndemo finished in {time.monotonic() - started:.0f} s")
    return 0 if result.ok else 1
