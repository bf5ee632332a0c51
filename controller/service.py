"""The controller service: one MQTT connection feeding a :class:`ControllerState`, and a decision
loop that publishes what it decides.

    subscribe control/stage/+ (retained levels), nodes/+/status, nodes/+/metrics, exits
        -> ControllerState (pure) -> every decide_interval_s: decide()
        -> publish RETAINED control/stage/<i> for each stage whose level changed
        -> publish control/decisions (the decision with all its inputs); one INFO log line

One :class:`Controller` owns one connection at a time (reconnecting with exponential backoff)
and three tasks (connection, decision loop, publisher); :meth:`Controller.run` cancels and awaits
all of them on exit and returns the run report. Control messages go through an outbox that
survives reconnects: a decision taken while the broker is away is published when it is back.
The session is clean: after a reconnect, stale exits and metrics are not replayed, and the
retained levels are learned again.

A node going offline (its Last Will, or a clean shutdown) is recorded and passed to the
``on_node_lost`` hook (sync or async); failure re-planning plugs in there.

A message the controller cannot use (malformed JSON, a level out of range, an exit without
its stages, ...) is ignored, counted (``state.counts["bad_messages"]``), and published on
``errors`` with ``node: "controller"``, like the nodes' rejections. An empty payload on a
retained topic is a clearing, not an error.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aiomqtt

from bus.connection import MqttSettings, raise_if_cancelling
from bus.messages import ErrorMessage, ExitMessage, LevelMessage, MetricsMessage, StatusMessage
from bus.topics import Topics
from controller.config import ControllerConfig
from controller.oracle import OracleSchedule
from controller.state import ControlDecision, ControllerState, NodeEvent
from pipeline.calibration import Calibration
from pipeline.errors import CodecError

log = logging.getLogger(__name__)

NodeHook = Callable[[NodeEvent], Awaitable[None] | None]
# Small control messages should not wait for Nagle's algorithm (up to 40 ms per hop).
NODELAY = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)
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
        on_node_lost: NodeHook | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        oracle_schedule: OracleSchedule | None = None,
    ) -> None:
        self.config = config
        self.mqtt = mqtt
        self.topics = Topics(pipe)
        self.client_id = (client_id or f"edgeprune-{pipe}-controller-{uuid.uuid4().hex[:6]}")[:64]
        self.on_node_lost = on_node_lost
        self._clock = clock
        self._wall = wall_clock
        self.state = ControllerState(
            config, calibration, now=clock(), oracle_schedule=oracle_schedule
        )
        self.ready = asyncio.Event()  # connected and subscribed (set again after a reconnect)
        self._connected = asyncio.Event()
        self._client: aiomqtt.Client | None = None
        self._outbox: asyncio.Queue[tuple[str, bytes, int, bool]] = asyncio.Queue()
        self._hooks: set[asyncio.Task[None]] = set()
        self._running = False
        self._bad_logged = 0

    # ----------------------------------------------------------------- lifecycle
    async def run(self, stop: asyncio.Event | None = None) -> dict[str, Any]:
        """Serve until ``stop`` is set (or the task is cancelled); returns the run report."""
        if self._running:
            raise RuntimeError("this Controller is already running")
        self._running = True
        stop = stop or asyncio.Event()
        tasks = [
            asyncio.create_task(self._connection_loop(), name="controller-connection"),
            asyncio.create_task(self._decision_loop(), name="controller-decisions"),
            asyncio.create_task(self._publisher(), name="controller-publisher"),
        ]
        stopper = asyncio.create_task(stop.wait())
        try:
            done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t is not stopper and t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
            await self._drain(timeout=2.0)
        finally:
            for t in [*tasks, stopper, *self._hooks]:
                t.cancel()
            await asyncio.gather(*tasks, stopper, *self._hooks, return_exceptions=True)
            self._connected.clear()
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
        """On shutdown: let queued control messages go out."""
        deadline = time.monotonic() + timeout
        while self._outbox.qsize() and self._connected.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    async def _connection_loop(self) -> None:
        backoff = 0.2
        while True:
            kwargs = self.mqtt.aiomqtt_kwargs()
            kwargs.setdefault("socket_options", NODELAY)
            client = aiomqtt.Client(
                **kwargs,
                identifier=self.client_id,
                clean_session=True,
                logger=logging.getLogger("aiomqtt"),
            )
            try:
                async with client:
                    self._client = client
                    backoff = 0.2
                    # levels first: the retained current levels are known before any decision
                    await client.subscribe(self.topics.control_stage_all, qos=1)
                    await client.subscribe(self.topics.status_all, qos=1)
                    await client.subscribe(self.topics.metrics_all, qos=0)
                    await client.subscribe(self.topics.exits, qos=1)
                    self._connected.set()
                    self.ready.set()
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
                    async for message in client.messages:
                        self._dispatch(message)
            except aiomqtt.MqttError as exc:
                raise_if_cancelling(exc)
                self._connected.clear()
                self.ready.clear()
                log.warning(
                    "broker %s unreachable (%s); reconnecting in %.1f s",
                    self.mqtt.url,
                    exc,
                    backoff,
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.config.reconnect_max_s)

    # ----------------------------------------------------------------- intake
    def _dispatch(self, message: aiomqtt.Message) -> None:
        now = self._clock()
        topic = str(message.topic)
        payload = bytes(message.payload) if isinstance(message.payload, bytes | bytearray) else b""
        try:
            if topic == self.topics.exits:
                self.state.on_exit(now, ExitMessage.from_json(payload))
            elif self.topics.node_of(topic) is not None and topic.endswith("/metrics"):
                self.state.on_metrics(now, MetricsMessage.from_json(payload))
            elif self.topics.node_of(topic) is not None and topic.endswith("/status"):
                if payload:
                    event = self.state.on_status(now, StatusMessage.from_json(payload))
                    if event is not None:
                        self._on_node_event(event)
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
        self._outbox.put_nowait((self.topics.errors, error.to_json(), 1, False))

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
        if self.on_node_lost is None:
            return
        try:
            result = self.on_node_lost(event)
        except Exception:
            log.exception("on_node_lost hook failed")
            return
        if inspect.isawaitable(result):
            task = asyncio.ensure_future(result)
            self._hooks.add(task)
            task.add_done_callback(self._hook_done)

    def _hook_done(self, task: asyncio.Task[None]) -> None:
        self._hooks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("on_node_lost hook failed: %r", task.exception())

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
            self._outbox.put_nowait(
                (self.topics.control_stage(level.stage), level.to_json(), 1, True)
            )
        self._outbox.put_nowait((self.topics.decisions, decision.to_message().to_json(), 1, False))

    async def _publisher(self) -> None:
        """Publishes the outbox in order; waits out disconnections (nothing is dropped)."""
        while True:
            topic, payload, qos, retain = await self._outbox.get()
            while True:
                await self._connected.wait()
                client = self._client
                try:
                    if client is None:
                        raise aiomqtt.MqttError("not connected")
                    await client.publish(topic, payload, qos=qos, retain=retain)
                    break
                except aiomqtt.MqttError as exc:
                    log.debug("publish to %s failed (%s); retrying", topic, exc)
                    await asyncio.sleep(0.05)


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
