"""Partitioning: the DP equals brute force; partitions validate and round-trip (device files:
test_devices.py)."""

from __future__ import annotations

import itertools
import json
import math
import random

import pytest

from pipeline.devices import MIB, Device
from pipeline.errors import ConfigError
from pipeline.partition import (
    BlockProfile,
    Partition,
    balanced_partition,
    exhaustive_partition,
    partition,
    uniform_partition,
)
from pipeline.placement import Placement


def _random_instance(rng: random.Random) -> tuple[list[BlockProfile], list[Device], int | None]:
    n, m = rng.randint(1, 7), rng.randint(1, 4)
    profile = [
        BlockProfile(
            f"b{i}",
            rng.uniform(0.001, 0.1),
            rng.randint(0, 3 * MIB),
            rng.randint(0, 2 * MIB),
            rng.randint(1_000, 500_000),
        )
        for i in range(n)
    ]
    devices = [
        Device(
            f"d{k}",
            speed=rng.uniform(0.3, 3.0),
            memory_mb=rng.uniform(1, 12),
            bandwidth_mbps=rng.uniform(5, 200),
            latency_ms=rng.uniform(0, 10),
        )
        for k in range(m)
    ]
    return profile, devices, rng.choice([None, 1, 2, 3])


def _check_plan(
    plan: Partition, profile: list[BlockProfile], devices: list[Device], max_stages: int | None
) -> None:
    by_name = {d.name: (k, d) for k, d in enumerate(devices)}
    order = [by_name[s.node][0] for s in plan.placement.stages]
    assert order == sorted(order)  # devices used in the given order
    assert plan.placement.num_blocks == len(profile)
    assert max_stages is None or len(plan.placement.stages) <= max_stages
    for s in plan.placement.stages:
        dev = by_name[s.node][1]
        blocks = profile[s.bounds.start : s.bounds.end]
        assert (
            sum(b.param_bytes for b in blocks) + max(b.activation_bytes for b in blocks)
            <= dev.memory_mb * MIB
        )


def test_partition_equals_exhaustive_on_random_instances() -> None:
    rng = random.Random(1234)
    infeasible = 0
    for _ in range(200):
        profile, devices, max_stages = _random_instance(rng)
        try:
            expected = exhaustive_partition(profile, devices, max_stages)
        except ConfigError:
            infeasible += 1
            with pytest.raises(ConfigError, match="fits in memory"):
                partition(profile, devices, max_stages)
            continue
        plan = partition(profile, devices, max_stages)
        _check_plan(plan, profile, devices, max_stages)
        assert plan.bottleneck_s == pytest.approx(expected.bottleneck_s, rel=1e-9)
        assert plan.stage_s is not None and expected.stage_s is not None
        assert sum(plan.stage_s) == pytest.approx(sum(expected.stage_s), rel=1e-9)
    assert 10 < infeasible < 150  # the memory caps bite on some instances, not all


def test_stage_cost_model_and_device_skipping() -> None:
    profile = [BlockProfile(f"b{i}", 0.1, MIB, MIB, 1_000_000) for i in range(4)]
    fast = dict(memory_mb=100, bandwidth_mbps=80, latency_ms=5)
    devices = [
        Device("a", speed=1.0, **fast),
        Device("slow", speed=0.01, **fast),
        Device("c", speed=1.0, **fast),
    ]
    plan = partition(profile, devices)
    assert plan.placement.nodes == ("a", "c")  # the very slow device is skipped
    first = plan.placement.bounds[0]
    # 1 block of 0.1 s at speed 1, plus 1 MB * 8 / 80 Mbit/s + 5 ms; then 3 blocks and no
    # outbound transfer (a 2 + 2 split would cost 0.305 s in its first stage)
    assert (first.start, first.end) == (0, 1)
    assert plan.stage_s == pytest.approx((0.1 + 0.1 + 0.005, 0.3))
    assert plan.bottleneck_s == pytest.approx(0.3)
    assert partition(profile, devices, max_stages=1).placement.nodes == ("a",)


def test_memory_forces_a_split() -> None:
    profile = [BlockProfile(f"b{i}", 0.1, 3 * MIB, MIB, 10) for i in range(4)]
    big_link = dict(bandwidth_mbps=1000, latency_ms=0)
    devices = [
        Device("a", speed=10.0, memory_mb=7, **big_link),
        Device("b", speed=1.0, memory_mb=100, **big_link),
    ]
    plan = partition(profile, devices)
    assert [(b.start, b.end) for b in plan.placement.bounds] == [(0, 2), (2, 4)]


def test_infeasible_has_a_clear_message() -> None:
    profile = [BlockProfile("huge", 0.1, 64 * MIB, MIB, 10)]
    devices = [Device("pi", speed=1, memory_mb=32, bandwidth_mbps=10, latency_ms=1)]
    with pytest.raises(ConfigError, match=r"65\.0 MiB.*\(pi\) has 32\.0 MiB"):
        partition(profile, devices)


def test_balanced_partition_is_optimal() -> None:
    rng = random.Random(7)
    for _ in range(100):
        times = [rng.uniform(0, 1) for _ in range(rng.randint(1, 8))]
        k = rng.randint(1, len(times))
        plan = balanced_partition(times, k)
        assert len(plan.placement.stages) == k
        best = min(
            max(sum(times[a:b]) for a, b in itertools.pairwise((0, *cuts, len(times))))
            for cuts in itertools.combinations(range(1, len(times)), k - 1)
        )
        assert plan.bottleneck_s == pytest.approx(best)


def test_uniform_partition() -> None:
    plan = uniform_partition(7, 3, devices=["x", "y", "z"])
    assert [(b.start, b.end) for b in plan.placement.bounds] == [(0, 2), (2, 5), (5, 7)]
    assert plan.placement.nodes == ("x", "y", "z") and plan.bottleneck_s is None
    assert uniform_partition(3, 3).placement.nodes == ("node0", "node1", "node2")
    with pytest.raises(ConfigError):
        uniform_partition(2, 3)
    with pytest.raises(ConfigError):
        uniform_partition(4, 2, devices=["only-one"])


def test_plan_json_round_trip_and_hash() -> None:
    plan = balanced_partition([0.1, 0.2, 0.3, 0.1], 2)
    back = Partition.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert back == plan
    same_placement = Partition(
        Placement.build(plan.placement.bounds, plan.placement.nodes), version=7, created_by="x"
    )
    assert same_placement.to_dict()["hash"] == plan.to_dict()["hash"]
    assert (
        uniform_partition(4, 2).placement.placement_hash()
        != balanced_partition([1, 1, 1, 5], 2).placement.placement_hash()
    )


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.update(schema=99),
        lambda d: d.update(stages="nope"),
        lambda d: d["stages"][1].update(start_block=3),  # gap
        lambda d: d["stages"][1].update(device="node0"),  # one device, two stages
        lambda d: d["stages"][0].update(start_block=1),
        lambda d: d["stages"][0].update(color="red"),
        lambda d: d.update(hash="0" * 16),
        lambda d: d.update(version=0),
    ],
)
def test_plan_from_dict_rejects_bad_plans(mutate: object) -> None:
    data = uniform_partition(4, 2).to_dict()
    mutate(data)  # type: ignore[operator]
    with pytest.raises(ConfigError):
        Partition.from_dict(data)


def test_bad_profiles_and_arguments() -> None:
    with pytest.raises(ConfigError):
        BlockProfile("b", -1.0, 0, 0, 0)
    with pytest.raises(ConfigError):
        BlockProfile("b", math.inf, 0, 0, 0)
    dev = [Device("a", 1, 10, 10, 1)]
    with pytest.raises(ConfigError):
        partition([], dev)
    with pytest.raises(ConfigError):
        partition([BlockProfile("b", 1, 0, 0, 0)], [])
    with pytest.raises(ConfigError):
        partition([BlockProfile("b", 1, 0, 0, 0)], dev, max_stages=0)
    with pytest.raises(ConfigError):
        partition([BlockProfile("b", 1, 0, 0, 0)], dev * 2)  # duplicate names
