"""The level optimizer is exact (equal to brute force) and fast."""

from __future__ import annotations

import json
import statistics
import time

import numpy as np
import pytest

from controller.optimizer import DEFAULT_RATIOS, brute_force, solve_bottleneck, solve_sum
from pipeline.calibration import LinearFit, LogisticAccuracyFit
from pipeline.errors import ConfigError


def _instance(rng: np.random.Generator, n: int, *, wild: bool = False):
    """Random fits; ``wild`` also draws slices that pruning does not speed up (a_i > 0) and
    accuracy weights with the wrong sign (g_i > 0), which the solvers must still get right."""
    b = rng.uniform(0.02, 0.1, n)
    a = -b * rng.uniform(0.0, 1.0, n)
    g = -rng.uniform(0.5, 10.0, n)
    if wild:
        a = np.where(rng.random(n) < 0.2, rng.uniform(0, 0.05, n), a)
        g = np.where(rng.random(n) < 0.2, rng.uniform(0, 3.0, n), g)
    latency = [LinearFit(a=float(x), b=float(y), r2=1.0) for x, y in zip(a, b, strict=True)]
    accuracy = LogisticAccuracyFit(
        g=tuple(float(v) for v in g),
        d=float(rng.uniform(-5, -1)),
        max_abs_error=0.0,
        lo=0.1,
        hi=float(rng.uniform(0.8, 0.99)),
    )
    a_min = float(rng.uniform(0.3, 0.99))  # some instances are infeasible
    slowdowns = [float(v) for v in rng.uniform(1.0, 4.0, n)]
    return latency, accuracy, a_min, slowdowns


@pytest.mark.parametrize("objective", ["bottleneck", "sum"])
def test_equals_brute_force_on_random_instances(objective: str) -> None:
    solver = solve_bottleneck if objective == "bottleneck" else solve_sum
    rng = np.random.default_rng(42 if objective == "sum" else 43)
    key = "predicted_bottleneck_s" if objective == "bottleneck" else "predicted_latency_s"
    outcomes = set()
    for trial in range(240):
        n = 1 + trial % 6
        lat, acc, a_min, slow = _instance(rng, n, wild=trial % 3 == 0)
        ratios = DEFAULT_RATIOS if trial % 4 else (0.0, 0.25, 0.5)
        ours = solver(lat, acc, a_min, ratios=ratios, slowdowns=slow)
        ref = brute_force(lat, acc, a_min, objective, ratios=ratios, slowdowns=slow)  # type: ignore[arg-type]
        assert ours.feasible == ref.feasible, (trial, ours, ref)
        assert getattr(ours, key) == pytest.approx(getattr(ref, key), rel=1e-12, abs=1e-15)
        assert ours.predicted_accuracy == pytest.approx(ref.predicted_accuracy, rel=1e-9)
        if ours.feasible:
            assert ours.predicted_accuracy >= a_min - 1e-12
        if objective == "bottleneck":
            assert ours.levels == ref.levels  # tie-breaks are deterministic and shared
        outcomes.add(ours.feasible)
    assert outcomes == {True, False}


def test_infeasible_returns_most_accurate_assignment() -> None:
    lat = [LinearFit(a=-0.05, b=0.1, r2=1.0)] * 3
    acc = LogisticAccuracyFit(g=(-5.0, -5.0, -5.0), d=-2.0, max_abs_error=0.0, lo=0.1, hi=0.9)
    for solver in (solve_bottleneck, solve_sum):
        d = solver(lat, acc, 0.95)
        assert not d.feasible
        assert d.levels == (0, 0, 0) and d.ratios == (0.0, 0.0, 0.0)


def test_bottleneck_prunes_only_the_bottleneck_while_sum_may_prune_a_fast_slice() -> None:
    # Slice 0 is the slow one but pruning it is costly in accuracy; slice 1 is fast and cheap to
    # prune. The sum objective spends the budget on slice 1; the bottleneck objective on slice 0.
    lat = [LinearFit(a=-0.06, b=0.1, r2=1.0), LinearFit(a=-0.08, b=0.05, r2=1.0)]
    acc = LogisticAccuracyFit(g=(-6.0, -1.0), d=-3.0, max_abs_error=0.0)
    a_min = float(acc.predict(np.array([0.2, 0.0])))
    bottleneck = solve_bottleneck(lat, acc, a_min - 1e-9)
    assert bottleneck.levels == (2, 0)
    assert bottleneck.predicted_bottleneck_s == pytest.approx(0.088)
    total = solve_sum(lat, acc, a_min - 1e-9)
    assert total.levels[1] > 0
    assert total.predicted_latency_s <= bottleneck.predicted_latency_s
    assert total.predicted_bottleneck_s > bottleneck.predicted_bottleneck_s


def test_bottleneck_leaves_slices_alone_that_do_not_help() -> None:
    lat = [
        LinearFit(a=-0.1, b=0.2, r2=1.0),
        LinearFit(a=-0.01, b=0.02, r2=1.0),
        LinearFit(a=-0.01, b=0.03, r2=1.0),
    ]
    acc = LogisticAccuracyFit(g=(-2.0, -2.0, -2.0), d=-4.0, max_abs_error=0.0)
    d = solve_bottleneck(lat, acc, 0.5)
    assert d.levels == (5, 0, 0)
    assert d.stage_s == pytest.approx((0.15, 0.02, 0.03))
    assert d.predicted_latency_s == pytest.approx(0.2)


def test_slowdown_moves_the_pruning_to_the_slow_node() -> None:
    lat = [LinearFit(a=-0.05, b=0.1, r2=1.0)] * 2
    acc = LogisticAccuracyFit(g=(-3.0, -3.0), d=-4.0, max_abs_error=0.0)
    even = solve_bottleneck(lat, acc, 0.8, slowdowns=[1.0, 1.0])
    assert even.levels[0] == even.levels[1]
    slowed = solve_bottleneck(lat, acc, 0.8, slowdowns=[1.0, 1.5])
    assert slowed.levels[1] > slowed.levels[0]
    # asked only to get every stage back to 0.1 s, it prunes the slowed node alone
    d = solve_bottleneck(lat, acc, 0.8, slowdowns=[1.0, 1.2], target_s=0.1)
    assert d.levels == (0, 4)  # (0.1 - 0.05 * 0.4) * 1.2 = 0.096
    assert d.predicted_bottleneck_s == pytest.approx(0.1)


def test_target_relaxes_to_the_most_accurate_assignment_meeting_it() -> None:
    lat = [LinearFit(a=-0.1, b=0.1, r2=1.0)] * 2
    acc = LogisticAccuracyFit(g=(-1.0, -1.0), d=-5.0, max_abs_error=0.0)
    tight = solve_bottleneck(lat, acc, 0.5)
    assert tight.levels == (5, 5)
    relaxed = solve_bottleneck(lat, acc, 0.5, target_s=0.08)
    assert relaxed.levels == (2, 2) and relaxed.feasible
    assert relaxed.predicted_accuracy > tight.predicted_accuracy
    # a target below what is reachable gives the optimal bottleneck
    assert solve_bottleneck(lat, acc, 0.5, target_s=0.01).levels == (5, 5)


def test_decision_reports_both_latencies_and_is_json() -> None:
    rng = np.random.default_rng(3)
    lat, acc, _, slow = _instance(rng, 4)
    d = solve_sum(lat, acc, 0.5, slowdowns=slow)
    assert d.predicted_latency_s == pytest.approx(sum(d.stage_s))
    assert d.predicted_bottleneck_s == pytest.approx(max(d.stage_s))
    assert d.ratios == tuple(DEFAULT_RATIOS[lv] for lv in d.levels)
    assert json.loads(json.dumps(d.to_dict()))["objective"] == "sum"


def test_eight_slices_decide_within_a_millisecond() -> None:
    rng = np.random.default_rng(0)
    instances = [_instance(rng, 8) for _ in range(10)]
    for solver in (solve_bottleneck, solve_sum):
        for lat, acc, a_min, slow in instances * 5:  # warm up
            solver(lat, acc, a_min, slowdowns=slow)
        samples = []
        for lat, acc, a_min, slow in instances * 30:
            t0 = time.perf_counter()
            solver(lat, acc, a_min, slowdowns=slow)
            samples.append(time.perf_counter() - t0)
        assert statistics.median(samples) < 1e-3, solver.__name__


@pytest.mark.parametrize(
    "kwargs",
    [
        {"ratios": (0.1, 0.2)},
        {"ratios": (0.0, 0.3, 0.2)},
        {"ratios": (0.0, 1.0)},
        {"slowdowns": [1.0]},
        {"slowdowns": [1.0, 0.0]},
        {"slowdowns": [1.0, float("nan")]},
    ],
)
def test_rejects_bad_arguments(kwargs: dict) -> None:
    lat = [LinearFit(a=-0.05, b=0.1, r2=1.0)] * 2
    acc = LogisticAccuracyFit(g=(-3.0, -3.0), d=-4.0, max_abs_error=0.0)
    with pytest.raises(ConfigError):
        solve_bottleneck(lat, acc, 0.8, **kwargs)


def test_rejects_mismatched_fits() -> None:
    acc = LogisticAccuracyFit(g=(-3.0, -3.0), d=-4.0, max_abs_error=0.0)
    with pytest.raises(ConfigError):
        solve_sum([LinearFit(a=-0.05, b=0.1, r2=1.0)], acc, 0.8)
    with pytest.raises(ConfigError):
        brute_force([LinearFit(a=-0.05, b=0.1, r2=1.0)] * 2, acc, 0.8, "mean")  # type: ignore[arg-type]
