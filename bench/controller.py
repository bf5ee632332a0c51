"""`edgeprune bench controller`: decision time of the level optimizer (the work is in
``bench.decision_time``, imported only when the bench runs, so --help stays fast).
"""

from __future__ import annotations

import argparse

from bench.goals import BenchReport, GoalSpec
from edgeprune.commands._common import add_json

DECISION_GOAL = GoalSpec("decision_ms_8_slices", "<=", 1.0)
GOALS = (DECISION_GOAL,)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "controller",
        help="optimizer decision time vs brute force",
        description="Times the bottleneck and sum solvers for 2, 4 and 8 slices (6 levels) on "
        "random instances, against brute force where it is feasible (2 and 4 slices), and checks "
        "they find the same optimum. Key: decision_ms_8_slices (goal <= 1 ms).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--runs", type=int, default=2000, help="timed calls per size and solver")
    parser.add_argument("--brute-runs", type=int, default=50, help="timed brute-force calls")
    parser.add_argument("--instances", type=int, default=20, help="random instances per size")
    parser.add_argument("--seed", type=int, default=0)
    add_json(parser)
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> BenchReport:
    from bench.decision_time import run

    return run(args)
