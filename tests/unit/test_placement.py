"""One placement type (pipeline/placement.py): its rules, and its round trip through the plan
message from each producer (partition, the SlimEdge planner) with the wire shape unchanged."""

from __future__ import annotations

import json
import random

import pytest

from bus.plan_message import PlanMessage
from controller.slimedge import Planner
from pipeline.errors import CodecError, ConfigError
from pipeline.partition import Partition, balanced_partition
from pipeline.placement import Placement, SliceBounds, StagePlacement
from pipeline.slicing import parse_cuts
from tests.unit.test_planner import _accuracy, _devices, _table

BOUNDS = parse_cuts("2,3", 5)


def test_placement_rules() -> None:
    placement = Placement.build(BOUNDS, ["a", "b", "c"], [0, 2, 1])
    assert placement.num_blocks == 5 and placement.nodes == ("a", "b", "c")
    assert placement.levels == (0, 2, 1) and placement.stage_of("b") == 1
    assert placement.stage_of("z") is None
    assert placement.without_levels().levels == (None, None, None)
    # the hash is of bounds and nodes only
    assert placement.placement_hash() == placement.without_levels().placement_hash()
    assert placement.placement_hash() != Placement.build(BOUNDS, ["a", "c", "b"]).placement_hash()
    bad = [
        lambda: Placement(()),
        lambda: Placement.build([SliceBounds(1, 3)], ["a"]),  # does not start at block 0
        lambda: Placement.build([SliceBounds(0, 2), SliceBounds(3, 5)], ["a", "b"]),  # a gap
        lambda: Placement.build([SliceBounds(0, 2), SliceBounds(2, 5)], ["a", "a"]),
        lambda: Placement.build(BOUNDS, ["a", "b"]),  # one node short
        lambda: Placement.build(BOUNDS, ["a", "b", "c"], [0, 1]),  # one level short
        lambda: StagePlacement(SliceBounds(0, 1), ""),
        lambda: StagePlacement(SliceBounds(0, 1), "a", -1),
        lambda: StagePlacement(SliceBounds(0, 1), "a", True),  # type: ignore[arg-type]
    ]
    for make in bad:
        with pytest.raises(ConfigError):
            make()


def test_a_partition_round_trips_through_the_plan_message() -> None:
    part = balanced_partition([0.1, 0.2, 0.3, 0.1, 0.2], 3, devices=["n0", "n1", "n2"])
    message = PlanMessage(4, part.placement, "from a partition")
    body = json.loads(message.to_json())
    # the wire shape of control/plan is what docs/topics.md shows
    assert set(body) == {"v", "kind", "version", "num_blocks", "reason", "stages"}
    assert body["num_blocks"] == 5
    assert body["stages"] == [
        {"stage": i, "start": b.start, "end": b.end, "node": n}
        for i, (b, n) in enumerate(zip(part.placement.bounds, part.placement.nodes, strict=True))
    ]
    back = PlanMessage.from_json(message.to_json())
    assert back == message and back.placement == part.placement
    # lists, as before: readers compare them with the node lists of exit messages
    assert back.nodes == ["n0", "n1", "n2"] and back.bounds == list(part.placement.bounds)
    # the partition file carries the same placement and the same hash
    again = Partition.from_dict(json.loads(json.dumps(part.to_dict())))
    assert again.placement == back.placement
    assert part.to_dict()["hash"] == back.placement.placement_hash()


def test_a_slimedge_plan_round_trips_through_the_plan_message() -> None:
    rng = random.Random(11)
    table = _table(rng)
    best = Planner(table, _accuracy(rng)).plan(_devices(rng, 3, table), 0.0).best
    assert best is not None and all(lv is not None for lv in best.placement.levels)
    message = best.to_message(2, "from the planner")
    back = PlanMessage.from_json(message.to_json())
    assert back == message
    assert back.placement == best.placement.without_levels()
    assert back.placement_of(best.placement.nodes[-1]) == (
        len(best.placement.stages) - 1,
        best.placement.bounds[-1],
    )


def test_the_plan_message_refuses_what_the_placement_refuses() -> None:
    good = json.loads(PlanMessage(1, Placement.build(BOUNDS, ["a", "b", "c"])).to_json())

    def payload(**change: object) -> bytes:
        return json.dumps({**good, **change}).encode()

    stages = good["stages"]
    with pytest.raises(CodecError, match="not contiguous"):
        PlanMessage.from_json(payload(stages=[stages[0], {**stages[2], "stage": 1}]))
    with pytest.raises(CodecError, match="only one stage"):
        PlanMessage.from_json(payload(stages=[stages[0], {**stages[1], "node": "a"}, stages[2]]))
    with pytest.raises(CodecError, match="the model has 6"):
        PlanMessage.from_json(payload(num_blocks=6))
    with pytest.raises(CodecError, match="numbered"):
        PlanMessage.from_json(payload(stages=[{**s, "stage": 7} for s in stages]))
    with pytest.raises(CodecError, match="node name"):
        PlanMessage.from_json(payload(stages=[{**stages[0], "end": 5, "node": "a/b"}]))
    with pytest.raises(CodecError, match="malformed plan"):
        PlanMessage.from_json(payload(stages=[{"stage": 0, "start": 0}]))
    with pytest.raises(ConfigError, match="no levels"):
        PlanMessage(1, Placement.build(BOUNDS, ["a", "b", "c"], [0, 0, 1]))
