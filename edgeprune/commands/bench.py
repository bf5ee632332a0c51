"""`edgeprune bench NAME`: benchmarks that compare two things in one run and print ratios.

Each benchmark lives in ``edgeprune.benches.<name>`` and exposes ``register(subparsers)``.
Every benchmark prints a readable table, and with ``--json`` one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import importlib

BENCHES = ["prune", "codec", "hop", "controller", "planner"]


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "bench",
        help="benchmarks (prune, codec, hop, controller, planner)",
        description="Benchmarks. Each compares two things in one run, prints ratios, and with "
        "--json prints one JSON object. Results are recorded in BENCHMARKS.md.",
    )
    bench_sub = parser.add_subparsers(dest="bench", metavar="BENCH")
    for name in BENCHES:
        try:
            module = importlib.import_module(f"edgeprune.benches.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"edgeprune.benches.{name}":
                continue
            raise
        module.register(bench_sub)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])
