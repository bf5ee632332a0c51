"""`edgeprune bench controller`: how long the controller takes to choose pruning levels.

Times :func:`~controller.optimizer.solve_bottleneck` and :func:`~controller.optimizer.solve_sum`
on random calibrations (6 levels, 2, 4 and 8 slices), warm-up first, then the median of many
calls over a set of instances; for 2 and 4 slices also the vectorised brute force, with the
ratio brute / ours and a check that both find the same optimum.
"""

from __future__ import annotations

import argparse
import itertools
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from bench.controller import DECISION_GOAL
from bench.goals import BenchReport
from controller.optimizer import Decision, brute_force, solve_bottleneck, solve_sum
from edgeprune.commands._common import format_table
from pipeline.calibration.accuracy import LogisticAccuracyFit
from pipeline.calibration.latency import LinearFit
from pipeline.calibration.timing import time_calls

SIZES = (2, 4, 8)
BRUTE_SIZES = (2, 4)
Instance = tuple[list[LinearFit], LogisticAccuracyFit, float, list[float]]


def random_instance(rng: np.random.Generator, n: int) -> Instance:
    """Slices of 20-100 ms that pruning to 0.5 makes up to 2x faster, on nodes slowed 1-3x; an
    accuracy curve from 0.93 to chance (10 classes) and an A_min the optimum has to work for."""
    base = rng.uniform(0.02, 0.1, n)
    latency = [LinearFit(a=-float(b * rng.uniform(0.2, 1.0)), b=float(b), r2=1.0) for b in base]
    accuracy = LogisticAccuracyFit(
        g=tuple(float(v) for v in -rng.uniform(1.0, 8.0, n)),
        d=-4.0,
        max_abs_error=0.0,
        lo=0.1,
        hi=0.93,
    )
    a_min = float(rng.uniform(0.6, 0.9))
    return latency, accuracy, a_min, [float(s) for s in rng.uniform(1.0, 3.0, n)]


def _median_ms(
    fn: Callable[[Instance], Decision], instances: list[Instance], runs: int, warmup: int
) -> float:
    """Median wall milliseconds of ``fn`` on the instances in turn, after ``warmup`` calls."""
    turn = itertools.cycle(instances)
    (times,) = time_calls(
        [lambda: fn(next(turn))], runs=runs, warmup=warmup, rounds=1, torch_inference=False
    )
    return times.median("wall") * 1e3


def _same(a: Decision, b: Decision, objective: str) -> bool:
    key = "predicted_bottleneck_s" if objective == "bottleneck" else "predicted_latency_s"
    return a.feasible == b.feasible and math.isclose(
        getattr(a, key), getattr(b, key), rel_tol=1e-9, abs_tol=1e-12
    )


def measure(runs: int, brute_runs: int, n_instances: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {"levels": 6, "runs": runs, "instances": n_instances, "sizes": {}}
    for n in SIZES:
        instances = [random_instance(rng, n) for _ in range(n_instances)]
        entry: dict[str, Any] = {}
        for objective, solver in (("bottleneck", solve_bottleneck), ("sum", solve_sum)):

            def ours(i: Instance, solver: Callable[..., Decision] = solver) -> Decision:
                return solver(i[0], i[1], i[2], slowdowns=i[3])

            entry[f"{objective}_ms"] = _median_ms(ours, instances, runs, warmup=runs // 10 + 10)
            if n in BRUTE_SIZES:

                def brute(i: Instance, objective: Any = objective) -> Decision:
                    return brute_force(i[0], i[1], i[2], objective, slowdowns=i[3])

                ms = _median_ms(brute, instances, brute_runs, warmup=3)
                entry[f"brute_{objective}_ms"] = ms
                entry[f"speedup_{objective}"] = ms / entry[f"{objective}_ms"]
                entry[f"agree_{objective}"] = all(
                    _same(ours(i), brute(i), objective) for i in instances
                )
        entry["feasible_fraction"] = (
            sum(solve_bottleneck(i[0], i[1], i[2], slowdowns=i[3]).feasible for i in instances)
            / n_instances
        )
        out["sizes"][str(n)] = entry
    out["decision_ms_8_slices"] = out["sizes"]["8"]["bottleneck_ms"]
    out["decision_ms_8_slices_sum"] = out["sizes"]["8"]["sum_ms"]
    return out


def run(args: argparse.Namespace) -> BenchReport:
    result = measure(args.runs, args.brute_runs, args.instances, args.seed)
    goals = (DECISION_GOAL.measured(result["decision_ms_8_slices"]),)
    return BenchReport(result, render(result), goals)


def render(result: dict[str, Any]) -> str:
    rows = []
    for n, e in result["sizes"].items():
        for obj in ("bottleneck", "sum"):
            rows.append(
                [
                    n,
                    obj,
                    e[f"{obj}_ms"],
                    e.get(f"brute_{obj}_ms", "-"),
                    e.get(f"speedup_{obj}", "-"),
                    e.get(f"agree_{obj}", "-"),
                ]
            )
    return "\n".join(
        [
            f"decision time, 6 levels, median of {result['runs']} calls over "
            f"{result['instances']} random instances per size",
            format_table(
                ["slices", "objective", "ours ms", "brute ms", "brute/ours", "same optimum"], rows
            ),
            f"decision_ms_8_slices (bottleneck) = {result['decision_ms_8_slices']:.4f}",
        ]
    )
