"""SlimEdge planner: exact search equals brute force and the unpruned DP, NSGA-II is close to
exact, memory caps make pruning necessary, SLO and failure-aware objectives, the accuracy
model."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest

from controller.slimedge import Planner, configuration_count, failure_weights
from pipeline.calibration.accuracy import AccuracyModel, accuracy_cache, fit_accuracy_model
from pipeline.calibration.slimedge import (
    Combo,
    CostTable,
    Measurements,
    contiguous_ranges,
    split_halves,
)
from pipeline.data import ArrayDataset
from pipeline.devices import MIB, Device
from pipeline.errors import ConfigError
from pipeline.multiview import view_levels
from pipeline.partition import partition

RATIOS = (0.0, 0.2, 0.4, 0.6)


def _table(rng: random.Random, n: int = 5) -> CostTable:
    r = np.asarray(RATIOS)
    keep = (1 - r) ** 2
    t = np.asarray([[rng.uniform(1e-3, 2e-2) * (0.3 + 0.7 * k) for k in keep] for _ in range(n)])
    params = np.asarray([[rng.uniform(0.1, 4.0) * MIB * k for k in keep] for _ in range(n)])
    act = np.asarray([[rng.uniform(0.01, 0.3) * MIB * (1 - x) for x in r] for _ in range(n)])
    out = np.asarray([[rng.uniform(1e3, 1e5) * (1 - x) for x in r] for _ in range(n)])
    return CostTable(
        tuple(f"b{i}" for i in range(n)), RATIOS, t, np.round(params), np.round(act), np.round(out)
    )


def _accuracy(rng: random.Random, n: int = 5) -> AccuracyModel:
    ranges = contiguous_ranges(n)
    acc = np.asarray(
        [[0.95 - rng.uniform(0.0, 0.08) * (j - i) * x for x in RATIOS] for i, j in ranges]
    )
    return AccuracyModel.from_importance(0.95, acc, num_classes=10, kappa=rng.uniform(0.8, 1.3))


def _devices(rng: random.Random, m: int, table: CostTable) -> list[Device]:
    full = table.footprint(0) / MIB
    return [
        Device(
            f"d{k}",
            speed=rng.uniform(0.3, 2.0),
            memory_mb=full * rng.uniform(0.2, 1.2),
            bandwidth_mbps=rng.uniform(10, 500),
            latency_ms=rng.uniform(0, 5),
            failure_prob=rng.uniform(0.0, 0.3),
        )
        for k in range(m)
    ]


def _brute(
    table: CostTable, acc: AccuracyModel, devices: list[Device], floor: float
) -> float | None:
    """Independent reference: every partition, ordered device choice and level vector."""
    n, m, best = table.n_blocks, len(devices), math.inf
    index = {r: k for k, r in enumerate(contiguous_ranges(n))}
    for s in range(1, min(n, m) + 1):
        for cuts in itertools.combinations(range(1, n), s - 1):
            edges = (0, *cuts, n)
            for devs in itertools.combinations(range(m), s):
                for levels in itertools.product(range(len(RATIOS)), repeat=s):
                    times, ok = [], True
                    for t, (k, lv) in enumerate(zip(devs, levels, strict=True)):
                        i, j, d = edges[t], edges[t + 1], devices[k]
                        mem = (
                            table.param_bytes[i:j, lv].sum() + table.activation_bytes[i:j, lv].max()
                        )
                        ok &= mem <= d.memory_mb * MIB
                        x = table.time_s[i:j, lv].sum() / d.speed
                        if j < n:
                            x += (
                                table.output_bytes[j - 1, lv] * 8 / (d.bandwidth_mbps * 1e6)
                                + d.latency_ms / 1e3
                            )
                        times.append(x)
                    a = acc.predict_one([index[(edges[t], edges[t + 1])] for t in range(s)], levels)
                    if ok and a >= floor:
                        best = min(best, max(times))
    return None if best == math.inf else best


def test_exact_search_equals_brute_force() -> None:
    rng = random.Random(7)
    for _ in range(12):
        table, acc = _table(rng, rng.randint(2, 5)), None
        acc = _accuracy(rng, table.n_blocks)
        devices = _devices(rng, rng.randint(1, 3), table)
        floor = rng.uniform(0.85, 0.95)
        result = Planner(table, acc).plan(devices, floor, method="exact")
        expected = _brute(table, acc, devices, floor)
        if expected is None:
            assert result.best is None
            continue
        assert result.best is not None and result.method == "exact"
        assert result.best.bottleneck_s == pytest.approx(expected, rel=1e-12)
        assert result.best.accuracy >= floor
        for memory, cap in zip(result.best.memory_bytes, result.best.cap_bytes, strict=True):
            assert memory <= cap


def test_level_zero_search_equals_the_unpruned_partition_dp() -> None:
    rng = random.Random(3)
    for _ in range(20):
        table = _table(rng)
        devices = _devices(rng, rng.randint(1, 4), table)
        planner = Planner(table, _accuracy(rng))
        result = planner.plan(devices, 0.0, levels=0)
        try:
            dp = partition(table.profile(0), devices)
        except ConfigError:
            assert result.best is None
            continue
        assert result.best is not None and set(result.best.levels) == {0}
        assert result.best.bottleneck_s == pytest.approx(dp.bottleneck_s, rel=1e-9)


def test_a_device_too_small_unpruned_holds_the_slice_pruned() -> None:
    rng = random.Random(11)
    table = _table(rng, 3)
    acc = AccuracyModel.from_importance(0.95, np.full((6, len(RATIOS)), 0.94), 10)
    # one device, 60% of the full model: nothing fits at level 0, level 1 ((0.8)^2 = 64%)
    # barely does not, level 2 (36%) does
    cap = 0.6 * table.footprint(0) / MIB
    dev = [Device("small", 1.0, cap, 100.0, 1.0)]
    planner = Planner(table, acc)
    assert planner.plan(dev, 0.9, levels=0).best is None
    best = planner.plan(dev, 0.9).best
    assert best is not None and best.levels[0] >= 1
    assert best.memory_bytes[0] <= best.cap_bytes[0]


def test_accuracy_floor_front_and_slo() -> None:
    rng = random.Random(5)
    table, acc = _table(rng), _accuracy(rng)
    devices = _devices(rng, 3, table)
    devices = [Device(d.name, d.speed, 1e6, d.bandwidth_mbps, d.latency_ms) for d in devices]
    planner = Planner(table, acc)
    loose, tight = planner.plan(devices, 0.5), planner.plan(devices, 0.94)
    assert loose.best and tight.best
    assert tight.best.accuracy >= 0.94 and loose.best.bottleneck_s <= tight.best.bottleneck_s
    front = loose.front
    assert all(
        a.objective_s < b.objective_s and a.accuracy < b.accuracy
        for a, b in itertools.pairwise(front)
    )
    assert loose.best.objective_s == pytest.approx(front[0].objective_s)
    # SLO: the most accurate plan whose bottleneck meets it
    slo = (loose.best.bottleneck_s + tight.best.bottleneck_s) / 2
    within = planner.plan(devices, 0.5, slo_s=slo)
    assert within.slo_met and within.best is not None
    assert within.best.bottleneck_s <= slo
    assert within.best.accuracy == pytest.approx(
        max(p.accuracy for p in front if p.objective_s <= slo)
    )
    assert planner.plan(devices, 0.5, slo_s=loose.best.bottleneck_s / 2).slo_met is False


def test_nsga2_is_close_to_exact_on_small_cases() -> None:
    rng = random.Random(21)
    gaps, matched, runs = [], 0, 0
    for _ in range(6):
        table, acc = _table(rng), _accuracy(rng)
        devices = _devices(rng, rng.randint(2, 4), table)
        floor = rng.uniform(0.86, 0.93)
        planner = Planner(table, acc)
        exact = planner.plan(devices, floor, method="exact")
        heur = planner.plan(devices, floor, method="nsga2", seed=1)
        assert heur.method == "nsga2" and heur.evaluated <= exact.evaluated
        if exact.best is None:
            assert heur.best is None
            continue
        runs += 1
        assert heur.best is not None and heur.best.accuracy >= floor
        gap = heur.best.objective_s / exact.best.objective_s - 1
        assert gap >= -1e-9  # exact is optimal
        gaps.append(gap)
        matched += gap < 1e-9
    assert runs >= 4
    assert matched >= 0.8 * runs and max(gaps) < 0.05


def test_the_switch_to_nsga2_follows_the_configuration_count() -> None:
    rng = random.Random(2)
    table, acc = _table(rng), _accuracy(rng)
    devices = _devices(rng, 3, table)
    count = configuration_count(5, 3, len(RATIOS))
    assert Planner(table, acc, exact_limit=count).plan(devices, 0.5).method == "exact"
    small = Planner(table, acc, exact_limit=count - 1, population=20, generations=5)
    assert small.plan(devices, 0.5).method == "nsga2"
    assert Planner(table, acc).plan(devices, 0.5).evaluated == count


def test_expected_objective_avoids_a_flaky_device_only_when_its_stall_costs_more() -> None:
    rng = random.Random(9)
    table, acc = _table(rng, 4), _accuracy(rng, 4)
    big = 10 * table.footprint(0) / MIB
    steady = Device("steady", 1.0, big, 1000, 0.5)
    planner = Planner(table, acc, max_stages=1, recovery_s=10.0, horizon_s=3600.0)
    for speed, prob, used in ((1.5, 0.0, True), (1.5, 0.9, False), (8.0, 0.2, True)):
        devices = [Device("flaky", speed, big, 1000, 0.5, failure_prob=prob), steady]
        blind = planner.plan(devices, 0.5).best
        result = planner.plan(devices, 0.5, objective="expected")
        aware = result.best
        assert blind and aware and blind.devices == ("flaky",)
        assert ("flaky" in aware.devices) is used, (speed, prob)
        q, after = result.meta["failure_weights"], result.meta["replanned_bottleneck_s"]
        assert q[1] == 0
        if prob > 0:  # B*_flaky: the best plan on the steady device alone
            assert after[0] == pytest.approx(planner.plan([steady], 0.5).best.bottleneck_s)  # type: ignore[union-attr]
        if used:  # E = B + q ((B* - B) / 2 + R^2 / 2H)
            b = aware.bottleneck_s
            assert aware.objective_s == pytest.approx(
                b + q[0] * ((after[0] - b) / 2 + 10.0**2 / 7200)
            )
    q = failure_weights([Device("a", 1, 1, 1, 0, 0.5), Device("b", 1, 1, 1, 0, 0.5)])
    assert q == pytest.approx([1 / 3, 1 / 3])  # none, a only, b only: equally likely


def test_view_levels_equals_brute_force() -> None:
    rng = random.Random(4)
    for _ in range(10):
        views, n_levels = 3, 4
        t = np.sort(
            np.asarray([[rng.uniform(1e-3, 1e-2) for _ in range(n_levels)] for _ in range(views)]),
            axis=1,
        )[:, ::-1]
        mem = np.sort(
            np.asarray([[rng.uniform(1, 4) * MIB for _ in range(n_levels)] for _ in range(views)]),
            axis=1,
        )[:, ::-1]
        acc = AccuracyModel.from_importance(
            0.9,
            np.asarray(
                [[0.9 - rng.uniform(0, 0.1) * lv for lv in range(n_levels)] for _ in range(views)]
            ),
            10,
        )
        devs = [
            Device(f"v{v}", rng.uniform(0.5, 2), rng.uniform(1.5, 4.5), 100, 1)
            for v in range(views)
        ]
        floor = rng.uniform(0.75, 0.9)
        got = view_levels(t, mem, devs, acc.predict_views, floor, fusion_s=1e-3)
        best = None
        for lv in itertools.product(range(n_levels), repeat=views):
            if (
                all(mem[v, lv[v]] <= devs[v].memory_mb * MIB for v in range(views))
                and acc.predict_one(range(views), lv) >= floor
            ):
                b = max(1e-3, *(t[v, lv[v]] / devs[v].speed for v in range(views)))
                best = b if best is None else min(best, b)
        assert (got is None) == (best is None)
        if got is not None:
            assert got[1] == pytest.approx(best)


def test_accuracy_model_is_exact_for_one_pruned_slice_and_fits_kappa() -> None:
    rng = random.Random(1)
    n = 3
    ranges = contiguous_ranges(n)
    measured = np.asarray([[0.95 - rng.uniform(0.01, 0.1) * x for x in RATIOS] for _ in ranges])
    base = AccuracyModel.from_importance(0.95, measured, 10)
    for k in range(len(ranges)):
        for lv in range(len(RATIOS)):
            assert (
                base.predict_one([k], [lv])
                == pytest.approx(max(measured[k, : lv + 1].min(), 0), abs=1e-6)
                or lv == 0
            )
    truth = AccuracyModel(base.z0, base.delta, 1.4, base.lo)
    combos = []
    for _ in range(12):
        cuts = sorted(c for c in range(1, n) if rng.random() < 0.6)
        bounds = tuple(itertools.pairwise([0, *cuts, n]))
        levels = tuple(rng.randrange(len(RATIOS)) for _ in bounds)
        units = [ranges.index(b) for b in bounds]
        combos.append(Combo(bounds, levels, truth.predict_one(units, levels)))
    table = _table(rng, n)
    m = Measurements(
        "toy",
        "h",
        10,
        table,
        tuple(ranges),
        np.zeros((len(ranges), len(RATIOS))),
        measured,
        tuple(combos),
    )
    fitted = fit_accuracy_model(m)
    assert fitted.kappa == pytest.approx(1.4, abs=1e-3)
    assert fitted.validation["loo_mae"] < 1e-4


def _uniform_devices(table: CostTable, m: int) -> list[Device]:
    """``m`` identical devices that hold the whole model: many placements tie."""
    full = table.footprint(0) / MIB
    return [Device(f"d{k}", 1.0, 2 * full, 1e4, 0.0, 0.0) for k in range(m)]


def test_the_measured_veto_with_a_margin_is_planning_on_the_measured_accuracy() -> None:
    """A measurement 0.05 below the prediction and a margin of 0.02: the plan is the one the
    predicted model alone gives for a floor 0.07 higher."""
    rng = random.Random(5)
    table, acc = _table(rng, 4), _accuracy(rng, 4)
    index = {r: k for k, r in enumerate(contiguous_ranges(4))}
    calls: list[tuple[tuple[tuple[int, int], ...], tuple[int, ...]]] = []

    def measured(bounds: tuple[tuple[int, int], ...], levels: tuple[int, ...]) -> float:
        calls.append((bounds, levels))
        return acc.predict_one([index[b] for b in bounds], levels) - 0.05

    devices = _devices(rng, 3, table)
    for floor in (0.80, 0.85, 0.88):
        vetoed = Planner(table, acc, measured=measured, measured_margin=0.02).plan(devices, floor)
        plain = Planner(table, acc).plan(devices, floor + 0.07)
        assert (vetoed.best is None) == (plain.best is None)
        if plain.best is not None and vetoed.best is not None:
            assert vetoed.best.objective_s == pytest.approx(plain.best.objective_s)
            bounds = tuple((b.start, b.end) for b in vetoed.best.bounds)
            assert measured(bounds, vetoed.best.levels) >= floor + 0.02 - 1e-9
    assert calls, "the veto was never asked"


def test_a_vetoed_configuration_is_not_tried_again_on_other_devices() -> None:
    """Every pruned configuration measures below the floor; with six identical devices each
    two-slice configuration has 15 placements, yet the veto spends one try per configuration
    and reaches the unpruned plan."""
    rng = random.Random(2)
    table, acc = _table(rng, 2), _accuracy(rng, 2)
    asked: list[tuple[tuple[tuple[int, int], ...], tuple[int, ...]]] = []

    def unpruned_only(bounds: tuple[tuple[int, int], ...], levels: tuple[int, ...]) -> float:
        asked.append((bounds, levels))
        return 0.95 if not any(levels) else 0.1

    pruned_configs = (len(RATIOS) - 1) + (len(RATIOS) ** 2 - 1)  # one slice, two slices
    planner = Planner(table, acc, measured=unpruned_only, veto_tries=pruned_configs + 1)
    best = planner.plan(_uniform_devices(table, 6), 0.5).best
    assert best is not None and not any(best.levels)
    assert len(asked) == len(set(asked)) <= pruned_configs + 1
    vetoes = len(asked) - 1
    assert vetoes > 0
    starved = Planner(table, acc, measured=unpruned_only, veto_tries=vetoes)
    assert starved.plan(_uniform_devices(table, 6), 0.5).best is None


def test_measured_accuracies_of_different_data_never_share_a_cache_file() -> None:
    """The cache is named after the set's content: a set with other labels or other images
    (same name, same model) gets its own file; the halves of a split are disjoint."""
    rng = random.Random(3)
    table = _table(rng, 2)
    ranges = contiguous_ranges(2)
    m = Measurements("m", "h", 10, table, tuple(ranges), np.zeros((3, 4)), np.full((3, 4), 0.9), ())
    images = np.zeros((20, 2, 2), dtype=np.uint8)
    labels = np.arange(20) % 2
    data = ArrayDataset(images, labels, ("a", "b"), "set/test")
    relabelled = ArrayDataset(images, 1 - labels, ("a", "b"), "set/test")
    blank = ArrayDataset(images + 1, labels, ("a", "b"), "set/test")
    paths = {accuracy_cache(m, d) for d in (data, relabelled, blank)}
    assert len(paths) == 3 and all(p.parent.name == "slimedge" for p in paths)
    assert accuracy_cache(m, data) == accuracy_cache(
        m, ArrayDataset(images, labels, ("a", "b"), "set/test")
    )
    a, b = split_halves(data)
    assert len(a) + len(b) == len(data) and a.name == "set/test/a"
    assert sorted(np.bincount(a.labels).tolist()) == sorted(np.bincount(b.labels).tolist())
