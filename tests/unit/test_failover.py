"""Failover logic without a broker: detection by Last Will and by heartbeats within the bound,
re-planning on the survivors with a higher version, levels rising under an SLO."""

from __future__ import annotations

import random

import pytest

from bus.connection import MqttSettings
from bus.messages import LevelMessage, MetricsMessage, NodeState, StatusMessage
from bus.plan_message import PlanMessage
from controller.core import ControllerState
from controller.failover import FailoverMonitor, FailoverSettings
from controller.node_table import Loss, NodeTable
from controller.service import Controller
from controller.slimedge import Planner
from pipeline.devices import MIB, Device
from pipeline.errors import ConfigError
from tests.unit.test_controller_service import calibration, config
from tests.unit.test_planner import _accuracy, _table


def _status(node: str, state: NodeState, reason: str = "") -> StatusMessage:
    return StatusMessage(node=node, state=state, ts=0.0, reason=reason)


SETTINGS = FailoverSettings(heartbeat_timeout_s=3.0, check_interval_s=0.25)


def _setup(
    cap_fraction: float = 2.0, slo_factor: float | None = None
) -> tuple[FailoverMonitor, PlanMessage, NodeTable]:
    rng = random.Random(17)
    table, acc = _table(rng), _accuracy(rng)
    cap = cap_fraction * table.footprint(0) / MIB
    devices = [Device(f"n{k}", 1.0, cap, 1000.0, 0.5) for k in range(3)]
    planner = Planner(table, acc)
    slo = None
    if slo_factor is not None:  # an SLO three devices meet unpruned, two only pruned
        slo = slo_factor * planner.plan(devices, 0.0, levels=0).best.bottleneck_s  # type: ignore[union-attr]
    first = planner.plan(devices, 0.8, slo_s=slo).best
    assert first is not None and len(first.placement.stages) == 3
    plan = first.to_message(1)
    monitor = FailoverMonitor(planner, devices, 0.8, SETTINGS, slo_s=slo, current=plan)
    table = NodeTable()  # the controller core's node table, which the monitor reads
    for d in devices:
        table.on_status(0.0, d.name, _status(d.name, "online"))
    return monitor, plan, table


def _beat(table: NodeTable, nodes: list[str], t: float) -> None:
    for n in nodes:
        table.heard(n, t)


def test_tracker_last_will_shutdown_heartbeat_and_return() -> None:
    tr = NodeTable()
    timeout = SETTINGS.heartbeat_timeout_s

    def check(now: float) -> list[Loss]:
        return tr.check(now, timeout, SETTINGS.check_interval_s)

    for n in ("a", "b", "c"):
        tr.heard(n, 0.0)
    tr.on_status(1.0, "a", _status("a", "offline", "connection lost"))
    tr.on_status(1.0, "b", _status("b", "offline", "shutdown"))
    assert tr.loss("a").reason == "last will"  # type: ignore[union-attr]
    assert tr.loss("b").reason == "shutdown"  # type: ignore[union-attr]
    assert check(3.0) == []  # c was heard at 0: not silent for more than 3 s yet
    lost = check(3.01)
    assert [(x.node, x.reason) for x in lost] == [("c", "heartbeat")]
    assert not tr.is_alive("a", 1.0, timeout) and not tr.is_alive("c", 3.1, timeout)
    tr.heard("d", 3.0)
    check(3.1)
    assert check(10.0) == []  # the checker stalled 6.9 s: not d's silence
    t, lost = 10.0, []
    while not lost:
        t += SETTINGS.check_interval_s
        lost = check(t)
    # d is found lost a full timeout after the stall ended (less the allowed interval)
    assert lost[0].node == "d" and 10.0 + SETTINGS.heartbeat_timeout_s - 0.5 < t < 14.0
    tr.on_status(5.0, "a", _status("a", "online"))
    assert tr.is_alive("a", 5.0, timeout) and tr.loss("a") is None
    with pytest.raises(ConfigError):
        FailoverSettings(heartbeat_timeout_s=1.0, check_interval_s=1.0)


def test_last_will_triggers_a_new_plan_on_the_survivors() -> None:
    monitor, plan, table = _setup()
    victim = plan.nodes[1]
    _beat(table, ["n0", "n1", "n2"], 0.5)
    assert monitor.check(table, 0.6) is None
    table.on_status(1.0, victim, _status(victim, "offline", "connection lost"))
    decision = monitor.check(table, 1.0)
    assert decision is not None
    assert decision.message.version == plan.version + 1
    assert victim not in decision.message.nodes and victim not in decision.survivors
    assert decision.lost[0].reason == "last will" and decision.decided_at - 1.0 == 0
    assert "failover" in decision.message.reason and victim in decision.message.reason
    for memory, cap in zip(decision.plan.memory_bytes, decision.plan.cap_bytes, strict=True):
        assert memory <= cap
    assert decision.plan.accuracy >= 0.8
    for stage, (message, planned) in enumerate(
        zip(decision.levels, decision.plan.levels, strict=True)
    ):
        level = LevelMessage.from_json(message.to_json())
        assert level.stage == stage and level.level == planned
        assert level.seq == decision.message.version
    assert monitor.current is decision.message
    assert monitor.check(table, 1.1) is None  # nothing new: no second plan


def test_silent_node_is_found_within_the_heartbeat_bound() -> None:
    monitor, plan, table = _setup()
    victim = plan.nodes[0]
    alive = [n for n in plan.nodes if n != victim]
    t, last = 0.0, 0.0
    _beat(table, list(plan.nodes), 0.0)
    decision = None
    while decision is None and t < 10:
        t += SETTINGS.check_interval_s
        _beat(table, alive, t)  # the others keep their 1 s heartbeats (here: every check)
        decision = monitor.check(table, t)
    assert decision is not None and decision.lost[0].reason == "heartbeat"
    assert SETTINGS.heartbeat_timeout_s < t - last <= SETTINGS.detection_bound_s
    assert victim not in decision.message.nodes


def test_levels_rise_to_keep_the_slo_on_fewer_devices() -> None:
    monitor, plan, table = _setup(slo_factor=1.02)
    first = monitor.planner.plan(monitor.devices, 0.8, slo_s=monitor.slo_s).best
    assert first is not None and sum(first.levels) == 0  # three devices: unpruned meets it
    _beat(table, ["n0", "n1", "n2"], 0.1)
    table.on_status(0.2, plan.nodes[2], _status(plan.nodes[2], "offline", "connection lost"))
    decision = monitor.check(table, 0.2)
    assert decision is not None
    slo = monitor.slo_s
    assert slo is not None and decision.plan.objective_s <= slo
    assert sum(decision.plan.levels) > 0  # two devices meet the SLO only pruned


def test_no_feasible_plan_keeps_the_old_one_until_a_node_returns() -> None:
    monitor, plan, table = _setup(cap_fraction=0.4)  # three small devices: nothing fits on two
    monitor.floor = 0.99
    victim = plan.nodes[0]
    _beat(table, list(plan.nodes), 0.1)
    table.on_status(0.2, victim, _status(victim, "offline", "connection lost"))
    assert monitor.check(table, 0.2) is None and monitor.current is plan
    assert monitor.check(table, 0.3) is None  # the same survivors are not tried again
    monitor.floor = 0.8
    table.on_status(0.4, victim, _status(victim, "online"))  # back: the plan is whole again
    assert monitor.check(table, 0.4) is None


def test_losing_a_node_outside_the_plan_changes_nothing() -> None:
    monitor, plan, table = _setup()
    monitor.devices = [*monitor.devices, Device("spare", 1.0, 1e6, 1000.0, 0.5)]
    table.on_status(0.0, "spare", _status("spare", "online"))
    table.on_status(0.5, "spare", _status("spare", "offline", "connection lost"))
    assert monitor.check(table, 0.5) is None and monitor.current is plan


def test_nodes_of_a_new_plan_may_be_silent_while_they_build() -> None:
    """After a re-plan, the survivors build their new slices and send nothing for seconds:
    within ``build_grace_s`` that is not a second failure (a Last Will still is)."""
    monitor, plan, table = _setup()
    grace = FailoverSettings(heartbeat_timeout_s=3.0, check_interval_s=0.25, build_grace_s=10.0)
    monitor.settings = grace
    _beat(table, ["n0", "n1", "n2"], 0.5)
    table.on_status(1.0, plan.nodes[1], _status(plan.nodes[1], "offline", "connection lost"))
    decision = monitor.check(table, 1.0)
    assert decision is not None
    t = 1.0
    while t < 10.5:  # the survivors are silent (building): no new loss, no new plan
        t += 0.25
        assert monitor.check(table, t) is None
        assert all(monitor.is_alive(table, n, t) for n in decision.message.nodes)
    monitor.check(table, 11.0)  # the grace (1 + 10 s) is over and they were silent: lost
    assert all(table.loss(n) is not None for n in decision.message.nodes)
    # a plan seen on control/plan (with its arrival time) grants the same grace
    fresh, _, fresh_table = _setup()
    fresh.settings = grace
    fresh.on_plan(PlanMessage(plan.version + 5, plan.placement), fresh_table, now=0.0)
    assert fresh.check(fresh_table, 9.0) is None and fresh.is_alive(fresh_table, "n0", 9.0)


def test_failover_reads_the_liveness_the_controller_core_took_in() -> None:
    """One record of node liveness: nodes heard only through the controller core's intake
    (its metrics, keyed by the topic's node) are alive for failover, a silence and a Last Will
    the core took in are the losses failover re-plans around, and the controller's failover
    handler reads that very table."""
    monitor, plan, _ = _setup()
    state = ControllerState(config(), calibration(), now=0.0)
    for n in plan.nodes:
        state.on_metrics(0.5, MetricsMessage(node=n, ts=0.5), node=n)
    assert all(monitor.is_alive(state.nodes, n, 0.6) for n in plan.nodes)
    assert monitor.check(state.nodes, 0.6) is None
    victim = plan.nodes[1]
    state.on_status(1.0, _status(victim, "offline", "connection lost"), node=victim)
    assert state.events[-1].node == victim  # the core's own event log saw it too
    decision = monitor.check(state.nodes, 1.0)
    assert decision is not None and [(x.node, x.reason) for x in decision.lost] == [
        (victim, "last will")
    ]
    assert victim not in decision.survivors and victim not in decision.message.nodes
    controller = Controller(
        config(), calibration(), MqttSettings(), pipe="liveness", failover=monitor
    )
    assert controller.failover is not None and controller.failover.nodes is controller.state.nodes
