"""Failure resilience: detect a lost node, re-plan the pipeline on the survivors, publish it.

**Detection**, from the controller's node table (:class:`~controller.node_table.NodeTable`:
the one record of when each node was last heard and whether it is lost, fed by the
controller's intake; the monitor keeps no liveness of its own, it reads the table and asks it
for the nodes found silent):

- *Last Will.* Every node connects with the retained Will ``status = offline, "connection
  lost"``. The broker publishes it as soon as it sees the connection gone: at once when the TCP
  connection closes (process killed, host rebooted: the kernel closes the socket), within
  1.5 x the MQTT keepalive (15 s by default) when the link dies silently. A graceful
  ``offline, "shutdown"`` counts as lost too (the node left).
- *Heartbeats.* Every node publishes ``metrics`` every ``metrics_interval_s`` (1 s). A node
  silent for ``heartbeat_timeout_s`` is lost. With checks every ``check_interval_s``, a node
  that stops (hung, frozen, partitioned) is detected at most ``heartbeat_timeout_s +
  check_interval_s`` after its last message, whatever the keepalive (a stall of the checker
  itself is not counted as the nodes' silence: :meth:`~controller.node_table.NodeTable.check`).
- *Build grace.* A node given a slice by a new plan builds its pruned variants before it
  serves (seconds on a small device: 1-9 s for resnet-s here, under load); it builds them in
  its slice thread, but a loaded device may still send no metrics meanwhile. For
  ``build_grace_s`` after a plan reaches the monitor, its nodes' silence does not count
  (their Last Will does), so a takeover is not mistaken for a second failure. A node that
  dies silently during that window is found by heartbeat at most ``build_grace_s +
  check_interval_s`` after the plan.

**Re-planning** (:class:`FailoverMonitor`). When a node of the current plan is lost, the
SlimEdge planner (:class:`~controller.slimedge.Planner`) plans again on the survivors (devices
of the table seen alive and not lost): a survivor takes over the lost blocks (every node holds
the full model: the checkpoint, 7.9 MB for resnet-s, and builds the variants of its new slice
from it: see ``docs/slimedge.md``), and levels rise so that the memory caps, the accuracy
floor and, with ``slo_s``, the SLO hold on fewer devices. The new plan is a
:class:`~bus.plan_message.PlanMessage` with the next version, published retained,
followed by the level of every stage (retained ``control/stage/<i>``). Nodes apply it without
restarting. Requests lost with the node are re-sent by the camera's journal.

A node that comes back is alive again and is a candidate at the next re-plan; the monitor
does not move work back to it by itself.

:class:`FailoverHandler` drives a monitor from the controller's own connection
(:class:`~controller.service.Controller` with ``failover=``): the statuses and metrics the
controller decodes go to its core's node table, which the monitor reads; the handler reads the
retained plan on the same connection. No second broker connection, no second liveness record.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bus.messages import LevelMessage, PlanMessage
from bus.session import Publisher
from bus.topics import Topics
from controller.node_table import Loss, NodeTable
from controller.slimedge import Objective, Planner, SlimPlan
from pipeline.devices import Device
from pipeline.errors import CodecError, ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FailoverSettings:
    """``heartbeat_timeout_s``: silence after which a node is lost (a few metrics intervals);
    ``check_interval_s``: how often the monitor looks; ``build_grace_s``: silence tolerated
    from the nodes of a new plan while they build their slices (module docstring)."""

    heartbeat_timeout_s: float = 3.0
    check_interval_s: float = 0.2
    build_grace_s: float = 30.0

    def __post_init__(self) -> None:
        if not 0 < self.check_interval_s < self.heartbeat_timeout_s:
            raise ConfigError("need 0 < check_interval_s < heartbeat_timeout_s")
        if self.build_grace_s < 0:
            raise ConfigError("build_grace_s must be >= 0")

    @property
    def detection_bound_s(self) -> float:
        """Longest time from a node's last message to its detection by heartbeat."""
        return self.heartbeat_timeout_s + self.check_interval_s


@dataclass(frozen=True)
class FailoverDecision:
    """A re-plan: what was lost, the new plan, its message and the retained level messages."""

    lost: tuple[Loss, ...]
    survivors: tuple[str, ...]
    plan: SlimPlan
    message: PlanMessage
    levels: tuple[LevelMessage, ...]  # retained on control/stage/<i>
    decided_at: float
    planning_s: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "lost": [{"node": x.node, "reason": x.reason} for x in self.lost],
            "survivors": list(self.survivors),
            "version": self.message.version,
            "plan": self.plan.to_dict(),
            "planning_s": self.planning_s,
            "detection_delay_s": [self.decided_at - x.at for x in self.lost],
        }


@dataclass
class FailoverMonitor:
    """Watches the nodes of the current plan and re-plans when one is lost (pure logic)."""

    planner: Planner
    devices: Sequence[Device]  # node id = device name
    floor: float
    settings: FailoverSettings = field(default_factory=FailoverSettings)
    objective: Objective = "bottleneck"
    slo_s: float | None = None
    current: PlanMessage | None = None
    decisions: list[FailoverDecision] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._failed: frozenset[str] | None = None  # survivors no plan fits

    def on_plan(self, message: PlanMessage, nodes: NodeTable, now: float | None = None) -> None:
        """A plan seen on ``control/plan``; with ``now``, its nodes get the build grace in
        ``nodes`` (the controller's node table)."""
        if self.current is None or message.version > self.current.version:
            self.current = message
            if now is not None:
                self._grant_grace(message, nodes, now)

    def _grant_grace(self, message: PlanMessage, nodes: NodeTable, now: float) -> None:
        for node in message.nodes:
            nodes.grant_grace(node, now + self.settings.build_grace_s)

    def is_alive(self, nodes: NodeTable, node: str, now: float) -> bool:
        """``node`` is alive in ``nodes`` under this monitor's heartbeat timeout."""
        return nodes.is_alive(node, now, self.settings.heartbeat_timeout_s)

    def check(self, nodes: NodeTable, now: float) -> FailoverDecision | None:
        """Look for lost nodes of the current plan in ``nodes`` (the controller's node table,
        after marking the ones silent too long); re-plan on the survivors if any."""
        nodes.check(now, self.settings.heartbeat_timeout_s, self.settings.check_interval_s)
        if self.current is None:
            return None
        lost = [x for n in self.current.nodes if (x := nodes.loss(n)) is not None]
        if not lost:
            return None
        survivors = [d for d in self.devices if self.is_alive(nodes, d.name, now)]
        key = frozenset(d.name for d in survivors)
        if not survivors or key == self._failed:
            return None
        started = time.perf_counter()
        result = self.planner.plan(
            survivors, self.floor, objective=self.objective, slo_s=self.slo_s
        )
        if result.best is None:
            log.error(
                "no plan on survivors %s meets memory and accuracy >= %.3f; keeping plan v%d",
                sorted(key),
                self.floor,
                self.current.version,
            )
            self._failed = key
            return None
        self._failed = None
        version = self.current.version + 1
        reason = "failover: " + ", ".join(f"{x.node} lost ({x.reason})" for x in lost)
        message = result.best.to_message(version, reason)
        levels = result.best.level_messages(version, reason)
        decision = FailoverDecision(
            tuple(lost),
            tuple(sorted(key)),
            result.best,
            message,
            levels,
            now,
            time.perf_counter() - started,
        )
        self.current = message
        self._grant_grace(message, nodes, now)
        self.decisions.append(decision)
        log.info(
            "plan v%d: %s on %s, levels %s (bottleneck %.2f ms, accuracy %.3f)",
            version,
            [(b.start, b.end) for b in message.bounds],
            message.nodes,
            list(result.best.levels),
            result.best.bottleneck_s * 1e3,
            result.best.accuracy,
        )
        return decision


async def publish_decision(
    publisher: Publisher, topics: Topics, decision: FailoverDecision
) -> None:
    """The plan (retained), then every stage's level (retained), in that order: a node that
    keeps its stage index gets the level after it applied the plan; one that moves subscribes
    and gets the retained level. Returns once the broker acknowledged all of them."""
    acks = [publisher.publish(topics.plan, decision.message.to_json(), qos=1, retain=True)]
    for level in decision.levels:
        acks.append(
            publisher.publish(
                topics.control_stage(level.stage), level.to_json(), qos=1, retain=True
            )
        )
    await asyncio.gather(*acks)


class FailoverHandler:
    """A :class:`FailoverMonitor` on the controller's connection: it reads ``nodes``, the
    controller core's node table (fed by the controller's dispatch with the statuses and
    metrics), gets the retained plan from the dispatch, and is checked every
    ``check_interval_s`` by :meth:`run`, which publishes each re-plan through the controller's
    session.

    When the broker goes away the table keeps its state, the stall is not counted as the
    nodes' silence (:meth:`~controller.node_table.NodeTable.check`), and a decision not yet
    acknowledged is
    published again by the session's outbox after the reconnect, before any new check."""

    def __init__(
        self,
        monitor: FailoverMonitor,
        nodes: NodeTable,
        topics: Topics,
        on_decision: Callable[[FailoverDecision], None] | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.monitor = monitor
        self.nodes = nodes
        self.topics = topics
        self.on_decision = on_decision
        self.taken: list[FailoverDecision] = []  # published (acknowledged) decisions
        self._clock = clock

    def subscriptions(self) -> list[tuple[str, int]]:
        """What failover needs beyond the controller's own subscriptions: the plan."""
        return [(self.topics.plan, 1)]

    def watching(self) -> None:
        log.info(
            "failover watching the nodes of %s (heartbeat timeout %.1f s)",
            self.topics.base,
            self.monitor.settings.heartbeat_timeout_s,
        )

    def on_plan(self, payload: bytes) -> None:
        if not payload:
            return  # a cleared retained plan
        try:
            self.monitor.on_plan(PlanMessage.from_json(payload), self.nodes, self._clock())
        except (CodecError, ConfigError) as exc:
            log.warning("failover: ignoring a bad message on %s: %s", self.topics.plan, exc)

    async def run(self, publisher: Publisher) -> None:
        """Check the monitor every ``check_interval_s``; publish each re-plan it takes."""
        while True:
            decision = self.monitor.check(self.nodes, self._clock())
            if decision is not None:
                await publish_decision(publisher, self.topics, decision)
                self.taken.append(decision)
                if self.on_decision is not None:
                    self.on_decision(decision)
            await asyncio.sleep(self.monitor.settings.check_interval_s)
