"""The controller's node table: one record per node, and the only record of node liveness.

:class:`~controller.core.ControllerState` feeds it from the nodes' ``status`` and ``metrics``
messages (node named by the topic, which the broker's ACL ties to the writer); the failover
monitor (:mod:`controller.failover`) reads it and asks it for the nodes found silent. Per node:

- the last status (``online`` / ``offline`` and why, since when) and what its metrics said
  (stage, level, counters: the core's estimates read them);
- when it was last *heard* (an ``online`` status or a metrics message);
- whether it is *lost*: an ``offline`` status (its Last Will: ``"last will"``; a clean
  shutdown: ``"shutdown"``), or silent for longer than a heartbeat timeout (``"heartbeat"``,
  found by :meth:`NodeTable.check`). Being heard again clears the loss;
- its *build grace*: silence does not count before a given time (it is building the slices
  of a new plan).

*Stall compensation*: the checks are expected every ``check_interval_s``; when the checker's
own loop ran late by more than two intervals (its process was busy or descheduled), the
delay is not counted as the nodes' silence (their messages may be waiting, unread, behind it):
every last-heard time moves forward by the delay.

Pure: no clock, no I/O; the caller passes the time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

from bus.messages import StatusMessage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeEvent:
    """A node was lost (offline status, e.g. its Last Will) or came back online."""

    kind: Literal["lost", "online"]
    node: str
    stage: int | None
    reason: str
    at: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "node": self.node,
            "stage": self.stage,
            "reason": self.reason,
            "at": self.at,
        }


@dataclass(frozen=True)
class Loss:
    """A node found lost: why (``"last will"``, ``"shutdown"``, ``"heartbeat"``) and when."""

    node: str
    reason: str
    at: float


@dataclass
class NodeInfo:
    node: str
    state: str = "unknown"
    stage: int | None = None
    since: float = 0.0
    reason: str = ""
    level: int | None = None
    level_changes: int | None = None
    level_stable_since: float = 0.0
    metrics_at: float | None = None
    # the previous metrics report (node clock, processed, queue depth): backlog throughput
    last_report: tuple[float, int, float] | None = None
    heard_at: float | None = None  # last online status or metrics (moved on by stalls)
    loss: Loss | None = None


class NodeTable(dict[str, NodeInfo]):
    """Node name -> :class:`NodeInfo`, with the liveness bookkeeping (module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self._grace: dict[str, float] = {}  # node -> its silence does not count before this
        self._checked: float | None = None  # when check() last ran

    def info(self, node: str, now: float) -> NodeInfo:
        """``node``'s record, made on first sight."""
        return self.setdefault(node, NodeInfo(node, since=now))

    # ------------------------------------------------------------------ intake
    def on_status(self, now: float, node: str, message: StatusMessage) -> NodeEvent | None:
        """``node``'s status; returns the event when it went offline or came back online."""
        info = self.info(node, now)
        previous = info.state
        info.state, info.since, info.reason = message.state, now, message.reason
        if message.stage is not None:
            info.stage = message.stage
        if message.state == "online":
            self.heard(node, now)
        elif info.loss is None:
            why = "shutdown" if message.reason == "shutdown" else "last will"
            self._lose(info, why, now)
        if message.state == "offline" and previous != "offline":
            return NodeEvent("lost", node, info.stage, info.reason or "offline", now)
        if message.state == "online" and previous == "offline":
            return NodeEvent("online", node, info.stage, info.reason, now)
        return None

    def heard(self, node: str, now: float) -> None:
        """Any sign of life (metrics, an ``online`` status): a lost node is back."""
        info = self.info(node, now)
        info.heard_at = now
        if info.loss is not None:
            log.info("node %s is back", node)
            info.loss = None

    def grant_grace(self, node: str, until: float) -> None:
        """Silence of ``node`` does not count before ``until`` (it is building a slice)."""
        self._grace[node] = max(self._grace.get(node, until), until)

    # ------------------------------------------------------------------ judging
    def silent(self, node: str, now: float, timeout_s: float) -> bool:
        """Heard before, not for more than ``timeout_s``, and not within its build grace."""
        info = self.get(node)
        t = None if info is None else info.heard_at
        return t is not None and now - t > timeout_s and now >= self._grace.get(node, now)

    def is_alive(self, node: str, now: float, timeout_s: float) -> bool:
        info = self.get(node)
        return (
            info is not None
            and info.loss is None
            and info.heard_at is not None
            and not self.silent(node, now, timeout_s)
        )

    def loss(self, node: str) -> Loss | None:
        info = self.get(node)
        return None if info is None else info.loss

    def check(self, now: float, timeout_s: float, check_interval_s: float) -> list[Loss]:
        """Nodes newly lost by a silence longer than ``timeout_s``; called every
        ``check_interval_s``. A stall of the checker is not counted as silence (module
        docstring)."""
        gap = 0.0 if self._checked is None else now - self._checked - check_interval_s
        self._checked = now
        if gap > 2 * check_interval_s:
            log.info("liveness checks stalled for %.2f s; not counted as silence", gap)
            for info in self.values():
                if info.heard_at is not None:
                    info.heard_at += gap
        return [
            self._lose(info, "heartbeat", now)
            for info in list(self.values())
            if info.loss is None and self.silent(info.node, now, timeout_s)
        ]

    def _lose(self, info: NodeInfo, reason: str, now: float) -> Loss:
        info.loss = Loss(info.node, reason, now)
        if reason == "heartbeat":  # a lost status is logged with its event by the service
            log.warning("node %s lost (%s)", info.node, reason)
        return info.loss
