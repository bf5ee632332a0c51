"""Failure resilience: detect a lost node, re-plan the pipeline on the survivors, publish it.

**Detection** (:class:`LivenessTracker`, pure; the caller passes the clock):

- *Last Will.* Every node connects with the retained Will ``status = offline, "connection
  lost"``. The broker publishes it as soon as it sees the connection gone: at once when the TCP
  connection closes (process killed, host rebooted: the kernel closes the socket), within
  1.5 x the MQTT keepalive (15 s by default) when the link dies silently. A graceful
  ``offline, "shutdown"`` counts as lost too (the node left).
- *Heartbeats.* Every node publishes ``metrics`` every ``metrics_interval_s`` (1 s). A node
  silent for ``heartbeat_timeout_s`` is lost. With checks every ``check_interval_s``, a node
  that stops (hung, frozen, partitioned) is detected at most ``heartbeat_timeout_s +
  check_interval_s`` after its last message, whatever the keepalive (a stall of the checker
  itself is not counted as the nodes' silence).
- *Build grace.* A node given a slice by a new plan builds its pruned variants before it
  serves (seconds on a small device: 1-9 s for resnet-s here, under load); it builds them in
  its slice thread, but a loaded device may still send no metrics meanwhile. For ``build_grace_s`` after a plan reaches the monitor, its nodes' silence does
  not count (their Last Will does), so a takeover is not mistaken for a second failure. A node
  that dies silently during that window is found by heartbeat at most ``build_grace_s +
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
controller decodes for its state are passed on to it, and it reads the retained plan there too;
no second broker connection.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bus.messages import LevelMessage, PlanMessage, StatusMessage
from bus.session import Publisher
from bus.topics import Topics
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
class Loss:
    """A node found lost: why (``"last will"``, ``"shutdown"``, ``"heartbeat"``) and when."""

    node: str
    reason: str
    at: float


class LivenessTracker:
    """Which nodes are alive, from their status and metrics messages (see module docstring)."""

    def __init__(self, settings: FailoverSettings) -> None:
        self.settings = settings
        self._last: dict[str, float] = {}
        self._lost: dict[str, Loss] = {}
        self._grace: dict[str, float] = {}  # node -> silence does not count before this
        self._checked: float | None = None

    def heard(self, node: str, now: float) -> None:
        """Any sign of life (metrics, an ``online`` status)."""
        self._last[node] = now
        if node in self._lost:
            log.info("node %s is back", node)
            del self._lost[node]

    def grace(self, node: str, until: float) -> None:
        """Silence of ``node`` does not count before ``until`` (it is building a slice)."""
        self._grace[node] = max(self._grace.get(node, until), until)

    def _silent(self, node: str, now: float) -> bool:
        t = self._last.get(node)
        return (
            t is not None
            and now - t > self.settings.heartbeat_timeout_s
            and now >= self._grace.get(node, now)
        )

    def status(self, node: str, state: str, reason: str, now: float) -> Loss | None:
        if state == "online":
            self.heard(node, now)
            return None
        if state != "offline" or node in self._lost:
            return None
        why = "shutdown" if reason == "shutdown" else "last will"
        return self._lose(node, why, now)

    def check(self, now: float) -> list[Loss]:
        """Nodes newly lost by silence. If the checker itself stalled (no check for several
        intervals: its process was busy or descheduled), the stall is not counted as the
        nodes' silence: their messages may be waiting, unread, behind it."""
        gap = 0.0 if self._checked is None else now - self._checked - self.settings.check_interval_s
        self._checked = now
        if gap > 2 * self.settings.check_interval_s:
            log.info("failover checks stalled for %.2f s; not counted as silence", gap)
            self._last = {n: t + gap for n, t in self._last.items()}
        return [
            self._lose(n, "heartbeat", now)
            for n in list(self._last)
            if n not in self._lost and self._silent(n, now)
        ]

    def is_alive(self, node: str, now: float) -> bool:
        return node not in self._lost and node in self._last and not self._silent(node, now)

    def loss(self, node: str) -> Loss | None:
        return self._lost.get(node)

    def _lose(self, node: str, reason: str, now: float) -> Loss:
        loss = Loss(node, reason, now)
        self._lost[node] = loss
        log.warning("node %s lost (%s)", node, reason)
        return loss


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
        self.tracker = LivenessTracker(self.settings)
        self._failed: frozenset[str] | None = None  # survivors no plan fits

    def on_plan(self, message: PlanMessage, now: float | None = None) -> None:
        """A plan seen on ``control/plan``; with ``now``, its nodes get the build grace."""
        if self.current is None or message.version > self.current.version:
            self.current = message
            if now is not None:
                self._grant_grace(message, now)

    def _grant_grace(self, message: PlanMessage, now: float) -> None:
        for node in message.nodes:
            self.tracker.grace(node, now + self.settings.build_grace_s)

    def on_status(self, node: str, status: StatusMessage, now: float) -> None:
        """``node``'s status; the node is named by the topic (the one the broker's ACL ties
        to the writer), not by the message."""
        self.tracker.status(node, status.state, status.reason, now)

    def on_metrics(self, node: str, now: float) -> None:
        self.tracker.heard(node, now)

    def check(self, now: float) -> FailoverDecision | None:
        """Look for lost nodes of the current plan; re-plan on the survivors if any."""
        self.tracker.check(now)
        if self.current is None:
            return None
        lost = [x for n in self.current.nodes if (x := self.tracker.loss(n)) is not None]
        if not lost:
            return None
        survivors = [d for d in self.devices if self.tracker.is_alive(d.name, now)]
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
        self._grant_grace(message, now)
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
    """A :class:`FailoverMonitor` on the controller's connection: fed by the controller's
    dispatch (statuses, metrics, the retained plan), checked every ``check_interval_s`` by
    :meth:`run`, which publishes each re-plan through the controller's session.

    When the broker goes away the monitor keeps its state, the stall is not counted as the
    nodes' silence (:meth:`LivenessTracker.check`), and a decision not yet acknowledged is
    published again by the session's outbox after the reconnect, before any new check."""

    def __init__(
        self,
        monitor: FailoverMonitor,
        topics: Topics,
        on_decision: Callable[[FailoverDecision], None] | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.monitor = monitor
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
            self.monitor.on_plan(PlanMessage.from_json(payload), self._clock())
        except (CodecError, ConfigError) as exc:
            log.warning("failover: ignoring a bad message on %s: %s", self.topics.plan, exc)

    def on_status(self, node: str, status: StatusMessage) -> None:
        self.monitor.on_status(node, status, self._clock())

    def on_metrics(self, node: str) -> None:
        self.monitor.on_metrics(node, self._clock())

    async def run(self, publisher: Publisher) -> None:
        """Check the monitor every ``check_interval_s``; publish each re-plan it takes."""
        while True:
            decision = self.monitor.check(self._clock())
            if decision is not None:
                await publish_decision(publisher, self.topics, decision)
                self.taken.append(decision)
                if self.on_decision is not None:
                    self.on_decision(decision)
            await asyncio.sleep(self.monitor.settings.check_interval_s)
