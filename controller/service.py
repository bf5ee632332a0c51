"""The controller service: one MQTT connection feeding a :class:`ControllerState`, and a decision
loop that publishes what it decides.

    subscribe control/stage/+ (retained levels), nodes/+/status, nodes/+/metrics, exits
        -> ControllerState (pure) -> every decide_interval_s: decide()
        -> publish RETAINED control/stage/<i> for each stage whose level changed
        -> publish control/decisions (the decision with all its inputs); one INFO log line

One :class:`Controller` owns one :class:`~bus.session.Session` (reconnecting with exponential
backoff, resubscribing) and a decision loop; :meth:`Controller.run` cancels and awaits them on
exit and returns the run report. Control messages go through the session's outbox, which
survives reconnects: a decision taken while the broker is away is published when it is back.
The session is clean: after a reconnect, stale exits and metrics are not replayed, and the
retained levels are learned again. The controller's retained status
(``control/status``: ``online`` once subscribed, ``offline`` on the way out or by its Last
Will) tells the experiment harness and operators that it is ready.

With a :class:`~controller.failover.FailoverMonitor`, failover is a handler on this same
connection (:class:`~controller.failover.FailoverHandler`): it reads node liveness from the
state's node table (``state.nodes``, the one record, fed here by the statuses and metrics), and
gets the retained plan.

A node going offline (its Last Will, or a clean shutdown) is logged and recorded in the state's
events (the run report); failure re-planning is controller/failover.py, which detects a lost
node by its Last Will and by its silence.

A message the controller cannot use (malformed JSON, a level out of range, an exit without
its stages, ...) is ignored, counted (``state.counts["bad_messages"]``), and published on
``errors`` with ``node: "controller"``, like the nodes' rejections. An empty payload on a
retained topic is a clearing, not an error.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from bus.connection import MqttSettings
from bus.messages import (
    ErrorMessage,
    ExitMessage,
    LevelMessage,
    MetricsMessage,
    NodeState,
    StatusMessage,
)
from bus.session import Presence, Received, Session
from bus.topics import Topics
from controller.config import ControllerConfig
from controller.core import ControlDecision, ControllerState
from controller.failover import FailoverDecision, FailoverHandler, FailoverMonitor
from controller.node_table import NodeEvent
from controller.oracle import OracleSchedule
from pipeline.calibration import Calibration
from pipeline.errors import CodecError

log = logging.getLogger(__name__)

_MAX_BAD_LOGGED = 10
ERROR_SOURCE = "controller"  # the `node` field of the controller's messages on `errors`


class Controller:
    """The controller of one pipeline (``edgeprune/<pipe>/...``) as an MQTT service."""

    def __init__(
        self,
        config: ControllerConfig,
        calibration: Calibration,
        mqtt: MqttSettings,
        *,
        pipe: str = "default",
        client_id: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        oracle_schedule: OracleSchedule | None = None,
        failover: FailoverMonitor | None = None,
        on_failover: Callable[[FailoverDecision], None] | None = None,
    ) -> None:
        self.config = config
        self.mqtt = mqtt
        self.topics = Topics(pipe)
        self.client_id = (client_id or f"edgeprune-{pipe}-controller-{uuid.uuid4().hex[:6]}")[:64]
        self._clock = clock
        self._wall = wall_clock
        self.state = ControllerState(
            config, calibration, now=clock(), oracle_schedule=oracle_schedule
        )
        self.failover = (
            None
            if failover is None
            else FailoverHandler(failover, self.state.nodes, self.topics, on_failover, clock=clock)
        )
        subscriptions = [
            # levels first: the retained current levels are known before any decision
            (self.topics.control_stage_all, 1),
            (self.topics.status_all, 1),
            (self.topics.metrics_all, 0),
            (self.topics.exits, 1),
            *(self.failover.subscriptions() if self.failover is not None else []),
        ]
        self._session = Session(
            mqtt,
            self.client_id,
            name="controller",
            clean_session=True,
            presence=Presence(self.topics.controller_status, self._status),
            subscriptions=subscriptions,
            on_message=self._dispatch,
            on_connect=self._on_connect,
            reconnect_max_s=config.reconnect_max_s,
        )
        # subscribed and online (cleared while the connection is lost)
        self.ready = self._session.connected
        self._running = False
        self._bad_logged = 0

    # ----------------------------------------------------------------- lifecycle
    async def run(self, stop: asyncio.Event | None = None) -> dict[str, Any]:
        """Serve until ``stop`` is set (or the task is cancelled); returns the run report."""
        if self._running:
            raise RuntimeError("this Controller is already running")
        self._running = True
        stop = stop or asyncio.Event()
        try:
            # the session is left last: it says offline once nothing here can publish
            async with self._session as session:
                stopper = asyncio.create_task(stop.wait())
                tasks = [
                    stopper,
                    asyncio.create_task(self._decision_loop(), name="controller-decisions"),
                ]
                if self.failover is not None:
                    tasks.append(
                        asyncio.create_task(self.failover.run(session), name="controller-failover")
                    )
                try:
                    done, _ = await asyncio.wait(
                        [session.task, *tasks], return_when=asyncio.FIRST_COMPLETED
                    )
                    for t in done:
                        if t is not stopper and t.exception() is not None:
                            raise t.exception()  # type: ignore[misc]
                    await self._drain(timeout=2.0)
                finally:
                    for t in tasks:
                        t.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            self._running = False
        report = self.state.report(self._clock())
        log.info(
            "controller stopped: %d prune and %d restore decisions, %d exits seen",
            report["counts"]["prune"],
            report["counts"]["restore"],
            report["counts"]["exits"],
        )
        return report

    async def _drain(self, timeout: float) -> None:
        """On shutdown: let queued control messages go out (if connected)."""
        if self._session.connected.is_set():
            await self._session.drain(timeout)

    @property
    def failover_decisions(self) -> list[FailoverDecision]:
        """The failover re-plans published so far (empty without failover)."""
        return [] if self.failover is None else list(self.failover.taken)

    def _status(self, state: NodeState, reason: str) -> bytes:
        """The controller's retained status (``control/status``)."""
        return StatusMessage(ERROR_SOURCE, state, self._wall(), reason).to_json()

    async def _on_connect(self) -> None:
        """Subscribed (the session made the subscriptions); its ``online`` status is next."""
        log.info(
            "controller connected to %s (pipe %s, policy %s, objective %s, "
            "SLO %.0f ms, A_min %.3f)",
            self.mqtt.url,
            self.topics.pipe,
            self.config.policy,
            self.config.objective,
            self.config.slo_ms,
            self.config.a_min,
        )
        if self.failover is not None:
            self.failover.watching()

    # ----------------------------------------------------------------- intake
    def _dispatch(self, message: Received) -> None:
        now = self._clock()
        topic, payload = message.topic, message.payload
        node = self.topics.node_of(topic)
        try:
            if topic == self.topics.exits:
                self.state.on_exit(now, ExitMessage.from_json(payload))
            elif node is not None and topic.endswith("/metrics"):
                self.state.on_metrics(now, MetricsMessage.from_json(payload), node=node)
            elif node is not None and topic.endswith("/status"):
                if payload:
                    status = StatusMessage.from_json(payload)
                    event = self.state.on_status(now, status, node=node)
                    if event is not None:
                        self._on_node_event(event)
            elif topic == self.topics.plan:
                if self.failover is not None:
                    self.failover.on_plan(payload)
            else:
                stage = self.topics.stage_of(topic)
                if stage is not None and "/control/" in topic:
                    self._on_level(now, stage, payload)
        except CodecError as exc:
            self.state.counts["bad_messages"] += 1
            self._bad_logged += 1
            level = logging.WARNING if self._bad_logged <= _MAX_BAD_LOGGED else logging.DEBUG
            log.log(level, "ignored a bad message on %s: %s", topic, exc)
            self._report_rejected(topic, payload, exc)

    def _report_rejected(self, topic: str, payload: bytes, exc: CodecError) -> None:
        """Publish a rejected input on ``errors`` (the nodes' error format)."""
        error = ErrorMessage(
            node=ERROR_SOURCE,
            topic=topic,
            reason=f"controller ignored it: {exc.reason}",
            ts=self._wall(),
            stage=self.topics.stage_of(topic),
            request_id=exc.request_id,
            size=len(payload),
        )
        self._session.publish(self.topics.errors, error.to_json(), 1, False)

    def _on_level(self, now: float, stage: int, payload: bytes) -> None:
        message = LevelMessage.from_json(payload) if payload else None
        if self.state.on_level(now, stage, message):
            log.info(
                "stage %d: level %d adopted from control/stage/%d (seq %s, reason: %s)",
                stage,
                self.state.levels[stage],
                stage,
                None if message is None else message.seq,
                "cleared" if message is None else message.reason,
            )

    def _on_node_event(self, event: NodeEvent) -> None:
        if event.kind == "online":
            log.info("node %s (stage %s) is back online", event.node, event.stage)
            return
        log.warning("node %s (stage %s) lost: %s", event.node, event.stage, event.reason)

    # ----------------------------------------------------------------- deciding
    async def _decision_loop(self) -> None:
        interval = self.config.decide_interval_s
        next_status = self._clock() + self.config.status_interval_s
        while True:
            await asyncio.sleep(interval)
            now = self._clock()
            decision = self.state.decide(now, wall=self._wall())
            if decision is not None:
                self._publish_decision(decision)
            if self.config.status_interval_s and now >= next_status:
                next_status = now + self.config.status_interval_s
                log.info("observing: %s", _status_line(self.state.snapshot(now)))

    def _publish_decision(self, decision: ControlDecision) -> None:
        log.info("%s", decision.log_line())
        for level in decision.level_messages():
            self._session.publish(self.topics.control_stage(level.stage), level.to_json(), 1, True)
        self._session.publish(self.topics.decisions, decision.to_message().to_json(), 1, False)


def _status_line(snap: dict[str, Any]) -> str:
    q, rate = snap["latency_quantile_s"], snap["arrival_rate"]
    stages = "; ".join(
        f"stage {s['stage']} level {s['level']} service {s['service_s'] * 1e3:.1f} ms "
        f"(x{s['slowdown']:.2f}) queue {s['queue_depth'] if s['queue_depth'] is not None else '?'}"
        for s in snap["stages"]
    )
    return (
        f"latency quantile {'?' if q is None else f'{q * 1e3:.0f} ms'} over "
        f"{snap['samples']} exits, rate {'?' if rate is None else f'{rate:.1f}'}/s "
        f"({snap['arrival_source']}); {stages}"
    )
