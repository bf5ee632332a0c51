"""The parts of `edgeprune bench planner` that decide its headline: the fraction of plans
whose measured accuracy meets the floor, and the veto margin chosen on data the veto did not
see (here: a synthetic 3-block model whose "held-out" accuracy is 0.03 below what the veto
measures, so only a margin of at least 0.03 makes the plans meet their floors)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from bench.planner_sim import (
    Scenarios,
    choose_margin,
    measure_plans,
    met_fraction,
    simulate,
)
from controller.slimedge import Planner
from pipeline.calibration.accuracy import AccuracyModel
from pipeline.calibration.slimedge import CostTable, contiguous_ranges
from pipeline.devices import MIB

RATIOS = (0.0, 0.2, 0.4, 0.6)
N = 3
GAP = 0.03  # held-out accuracy = what the veto measures - GAP


def _table() -> CostTable:
    rng = random.Random(7)
    keep = (1 - np.asarray(RATIOS)) ** 2
    t = np.asarray([[rng.uniform(1e-3, 2e-2) * (0.3 + 0.7 * k) for k in keep] for _ in range(N)])
    params = np.asarray([[rng.uniform(0.1, 4.0) * MIB * k for k in keep] for _ in range(N)])
    act = np.asarray([[0.1 * MIB * (1 - x) for x in RATIOS] for _ in range(N)])
    out = np.asarray([[1e4 * (1 - x) for x in RATIOS] for _ in range(N)])
    return CostTable(tuple(f"b{i}" for i in range(N)), RATIOS, t, params, act, out)


def _accuracy() -> AccuracyModel:
    acc = np.asarray(
        [[0.95 - 0.02 * (j - i) * x / 0.2 for x in RATIOS] for i, j in contiguous_ranges(N)]
    )
    return AccuracyModel.from_importance(0.95, acc, num_classes=10)


def _predicted(model: AccuracyModel):  # type: ignore[no-untyped-def]
    index = {r: k for k, r in enumerate(contiguous_ranges(N))}
    return lambda bounds, levels: model.predict_one([index[tuple(b)] for b in bounds], levels)


HOW = Scenarios(
    count=40, seed=3, devices=(2, 3), drop=(0.01, 0.08), full_model_gb=2.0, objective="bottleneck"
)


def test_met_fraction_counts_plans_only_and_needs_the_floor() -> None:
    records = [
        {"floor": 0.9, "se_mem_ok": True},
        {"floor": 0.9, "se_mem_ok": True},
        {"floor": 0.9, "se_mem_ok": True},
        {"floor": 0.9, "se_mem_ok": False},
    ]
    assert met_fraction(records, [0.91, 0.89, None, 0.95]) == pytest.approx(1 / 3)
    assert met_fraction(records[:1], [None]) is None


def test_the_margin_is_the_smallest_one_that_meets_the_target_on_held_out_data() -> None:
    table, model = _table(), _accuracy()
    veto = _predicted(model)

    def held_out(bounds, levels):  # type: ignore[no-untyped-def]
        return veto(bounds, levels) - GAP

    def planner_with(margin: float) -> Planner:
        return Planner(table, model, measured=veto, measured_margin=margin)

    choice = choose_margin(planner_with, table, 0.95, HOW, held_out, 0.95, (0.0, 0.01, 0.03, 0.05))
    assert choice["reached"] and choice["margin"] == 0.03
    tried = [t["margin"] for t in choice["tried"]]
    assert tried == [0.0, 0.01, 0.03]  # stops at the first margin that reaches the target
    assert (
        choice["tried"][0]["bounds_met_fraction"]
        < 0.95
        <= choice["tried"][-1]["bounds_met_fraction"]
    )
    # with that margin, the plans meet their floors on the held-out data
    records = simulate(planner_with(0.03), table, 0.95, HOW, baselines=False)
    assert met_fraction(records, measure_plans(records, held_out)) == 1.0
    unreachable = choose_margin(planner_with, table, 0.95, HOW, held_out, 0.95, (0.0, 0.01))
    assert not unreachable["reached"] and unreachable["margin"] == 0.01
