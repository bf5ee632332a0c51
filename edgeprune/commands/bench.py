"""`edgeprune bench NAME`: benchmarks that compare two things in one run and print ratios.

Each benchmark lives in ``bench.<name>`` and exposes ``register(subparsers)``, whose
``func`` returns a :class:`~bench.goals.BenchReport`, and ``GOALS`` (its
:class:`~bench.goals.GoalSpec` values). This module gives every benchmark the same
``--check`` and ``--goal`` options and prints the report: a readable table, or with ``--json``
one JSON object on stdout, then the goals. With ``--check`` a missed goal makes the exit code 1
and is named on stderr; without it the exit code is 0.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import sys
from collections.abc import Callable, Sequence

from bench.goals import (
    BenchReport,
    GoalSpec,
    check_overrides,
    goals_json,
    missed,
    missed_message,
    parse_goal_override,
    render_goals,
    with_targets,
)
from edgeprune.commands._common import print_json

BENCHES = ["prune", "codec", "hop", "controller", "planner"]


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "bench",
        help="benchmarks (prune, codec, hop, controller, planner)",
        description="Benchmarks. Each compares two things in one run, prints ratios and its "
        "goals, and with --json prints one JSON object; with --check it exits 1 when a goal "
        "is missed. Results are recorded in BENCHMARKS.md.",
    )
    bench_sub = parser.add_subparsers(dest="bench", metavar="BENCH")
    for name in BENCHES:
        try:
            module = importlib.import_module(f"bench.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"bench.{name}":
                continue
            raise
        module.register(bench_sub)
        add_goal_options(bench_sub.choices[name], name, module.GOALS)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])


def add_goal_options(parser: argparse.ArgumentParser, name: str, specs: Sequence[GoalSpec]) -> None:
    """``--check`` and ``--goal`` on one bench's parser, and its ``func`` wrapped to print and
    check the goals its run returns."""
    listed = ", ".join(f"{s.figure} {s.comparison} {s.target:g}" for s in specs) or "none"
    parser.add_argument(
        "--check",
        action="store_true",
        help=f"exit 1 and name the figure when a goal is missed (goals: {listed})",
    )
    parser.add_argument(
        "--goal",
        action="append",
        type=parse_goal_override,
        default=[],
        metavar="FIGURE=TARGET",
        help="replace one goal's target for this run (repeatable)",
    )
    parser.set_defaults(
        func=functools.partial(
            run_checked, run=parser.get_default("func"), specs=tuple(specs), name=name
        )
    )


def run_checked(
    args: argparse.Namespace,
    *,
    run: Callable[[argparse.Namespace], BenchReport],
    specs: tuple[GoalSpec, ...],
    name: str,
) -> int:
    """Run one bench, print its report and goals; 1 if ``--check`` and a goal was missed."""
    overrides = dict(args.goal)
    check_overrides(specs, overrides, name)
    report = run(args)
    goals = with_targets(report.goals, overrides)
    if args.json:
        print_json({**report.data, **goals_json(goals)})
    else:
        print(report.text)
        print(render_goals(goals))
    failed = missed(goals)
    if args.check and failed:
        print(missed_message(name, failed), file=sys.stderr)
        return 1
    return 0
