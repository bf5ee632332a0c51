"""The one subscriber that watches a pipe: what `edgeprune tap` and `top` show, what the
experiment harness records, what the integration tests check and what the hop bench times.

:class:`Observer` owns one connection. It subscribes to its filters and hands every message,
as an :class:`Observed` value (topic, payload as received, retained flag, receipt time), to
one callback, in the order the broker delivered them; it knows no message kinds. It runs in
the foreground (:meth:`Observer.watch`: until a stop event, a message count or a timeout) or
in the background (:meth:`Observer.running`: subscribed when the block starts, cancelled and
awaited when it ends). It does not reconnect: in the foreground, losing the broker raises
:class:`~pipeline.errors.BrokerError`; in the background it ends the observation with a
warning, and :meth:`Observer.raise_if_failed` raises it (a tool fails instead of showing a
stale view).

:class:`Recorder` is the observer that keeps what one pipe did, by kind: ``send`` (what a
camera sent on ``stage/0/<camera>``: request id, camera, entry time), ``result``, ``exit``,
``level``, ``decision``, ``status``, ``metrics`` and ``error``. Each record is the message's
JSON object plus ``rx`` (receipt, epoch seconds) and, for a level, its ``topic``. It subscribes
only to the topics of the kinds it was asked for (stage tensors past stage 0 never), keeps
every record in memory (:class:`Events`) and, given a path, appends it to an ``events.jsonl``
file, so a report can be recomputed from the file alone (:func:`load_events`).
:func:`record_of` is the one place a recorded message is parsed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aiomqtt

from bus.connection import MqttSettings
from bus.messages import PlanMessage, decode_any
from bus.session import raise_if_cancelling
from bus.topics import Topics
from pipeline import codec
from pipeline.errors import BrokerError, CodecError, ConfigError

log = logging.getLogger(__name__)

KINDS = ("send", "result", "exit", "level", "decision", "status", "metrics", "error")
KEPT_AFTER_RESET = ("status", "level", "decision")  # state, not traffic: a warm-up keeps them


@dataclass(frozen=True, slots=True)
class Observed:
    """One message as the observer received it (the payload is the client's bytes, not a
    copy)."""

    topic: str
    payload: bytes | bytearray
    retained: bool
    rx: float  # epoch seconds at receipt


MessageHandler = Callable[[Observed], None]


class Observer:
    """One connection that subscribes to ``subscriptions`` ((filter, QoS) pairs) and calls
    ``on_message`` for every message (module docstring)."""

    def __init__(
        self,
        mqtt: MqttSettings,
        subscriptions: Iterable[tuple[str, int]],
        on_message: MessageHandler,
    ) -> None:
        self.mqtt = mqtt
        self.subscriptions = tuple(subscriptions)
        if not self.subscriptions:
            raise ConfigError("an observer needs at least one topic filter")
        self.on_message = on_message
        self.ready = asyncio.Event()  # connected and subscribed
        self.seen = 0  # messages handed to on_message
        self._listener: asyncio.Task[None] | None = None

    async def watch(
        self,
        stop: asyncio.Event | None = None,
        *,
        count: int | None = None,
        timeout: float | None = None,
        on_ready: Callable[[], None] | None = None,
    ) -> int:
        """Observe in the foreground until ``stop`` is set, ``count`` messages were handled or
        ``timeout`` seconds passed; returns how many were handled. ``on_ready`` is called once
        subscribed. Raises :class:`BrokerError` when the connection fails."""
        if count is not None and count < 1:
            raise ConfigError(f"count must be positive, not {count}")
        listener = self._start(count)
        ending: list[asyncio.Task[Any]] = [listener]
        if stop is not None:
            ending.append(asyncio.create_task(stop.wait()))
        helpers = (
            [] if on_ready is None else [asyncio.create_task(_call_when_set(self.ready, on_ready))]
        )
        try:
            await asyncio.wait(ending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if listener.done():
                listener.result()  # raises the connection error
        finally:
            for task in (*ending, *helpers):
                task.cancel()
            await asyncio.gather(*ending, *helpers, return_exceptions=True)
        return self.seen

    @contextlib.asynccontextmanager
    async def running(self, timeout: float = 20.0) -> AsyncIterator[Observer]:
        """Observe in the background while the block runs; subscribed when it starts (else
        :class:`BrokerError` within ``timeout`` seconds)."""
        listener = self._start(None)
        try:
            ready = asyncio.create_task(self.ready.wait())
            done, _ = await asyncio.wait(
                [ready, listener], timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            ready.cancel()
            if listener in done:
                listener.result()  # raises the connection error
            if not self.ready.is_set():
                raise BrokerError(f"the observer could not subscribe at {self.mqtt.url}")
            yield self
        finally:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)
            if not listener.cancelled() and listener.exception() is not None:
                log.warning("the observation ended early: %s", listener.exception())

    def _start(self, count: int | None) -> asyncio.Task[None]:
        if self._listener is not None and not self._listener.done():
            raise RuntimeError("this Observer is already observing")
        self.ready.clear()
        self._listener = asyncio.create_task(self._listen(count), name="observer")
        return self._listener

    def raise_if_failed(self) -> None:
        """Inside :meth:`running`: raise the error that ended the connection, if one did."""
        listener = self._listener
        if listener is not None and listener.done() and not listener.cancelled():
            listener.result()

    async def _listen(self, count: int | None) -> None:
        try:
            async with aiomqtt.Client(
                **self.mqtt.aiomqtt_kwargs(), logger=logging.getLogger("aiomqtt")
            ) as client:
                for topic, qos in self.subscriptions:
                    await client.subscribe(topic, qos=qos)
                self.ready.set()
                async for message in client.messages:
                    payload = message.payload
                    self.on_message(
                        Observed(
                            str(message.topic),
                            payload
                            if isinstance(payload, bytes | bytearray)
                            else str(payload or "").encode(),
                            bool(message.retain),
                            time.time(),
                        )
                    )
                    self.seen += 1
                    if count is not None and self.seen >= count:
                        return
        except aiomqtt.MqttError as exc:
            raise_if_cancelling(exc)
            raise BrokerError(f"observer at {self.mqtt.url}: {exc}") from exc


async def _call_when_set(event: asyncio.Event, callback: Callable[[], None]) -> None:
    await event.wait()
    callback()


# --- the recorder ---------------------------------------------------------------------------


@dataclass
class Events:
    """Everything one run produced, by kind; each item is a JSON body plus ``rx`` (receipt
    epoch seconds) and, for levels, ``topic``."""

    by_kind: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: {k: [] for k in KINDS})

    def add(self, kind: str, body: dict[str, Any]) -> None:
        self.by_kind.setdefault(kind, []).append(body)

    def __getitem__(self, kind: str) -> list[dict[str, Any]]:
        return self.by_kind.setdefault(kind, [])

    def counts(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.by_kind.items()}


def load_events(path: str | Path) -> Events:
    """Read an ``events.jsonl`` written by a :class:`Recorder`."""
    events = Events()
    with Path(path).open(encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            item = json.loads(line)
            kind = item.pop("event")
            if kind == "reset":  # a warm-up ended: what came before does not count
                events = Events(
                    by_kind={k: v for k, v in events.by_kind.items() if k in KEPT_AFTER_RESET}
                )
                continue
            events.add(kind, item)
    return events


def subscriptions_for(topics: Topics, kinds: Iterable[str]) -> list[tuple[str, int]]:
    """The (filter, QoS) pairs that carry ``kinds`` of pipe ``topics`` (levels, decisions and
    the controller's status share ``control/#``)."""
    wanted = set(kinds)
    unknown = wanted - set(KINDS)
    if unknown:
        raise ConfigError(f"unknown message kinds {sorted(unknown)}; known: {', '.join(KINDS)}")
    by_kind = (
        (("send",), topics.camera_stage_all, 1),
        (("result",), topics.results, 1),
        (("exit",), topics.exits, 1),
        (("level", "decision"), topics.control_all, 1),
        (("status",), topics.status_all, 1),
        (("metrics",), topics.metrics_all, 0),
        (("error",), topics.errors_all, 1),
    )
    chosen = [(topic, qos) for carried, topic, qos in by_kind if wanted & set(carried)]
    if "status" in wanted and (topics.control_all, 1) not in chosen:
        chosen.append((topics.controller_status, 1))  # the controller's, under control/
    return chosen


def record_of(topics: Topics, topic: str, payload: bytes | bytearray) -> tuple[str, dict[str, Any]]:
    """(kind, body) of one message of pipe ``topics``: a camera's stage-0 message becomes a
    ``send`` (request id, camera, entry time, attempt, label), a JSON message its object
    (``kind`` and ``v`` kept, validated by its class in :mod:`bus.messages`) plus, for a level
    or a status, its ``topic``. Raises :class:`~pipeline.errors.CodecError` for a payload that
    does not decode or validate."""
    if topics.camera_of(topic) is not None:
        msg = codec.decode_stage(payload)
        return "send", {
            "request_id": msg.request_id,
            "camera": msg.camera,
            "entry_ts": msg.entry_ts,
            "attempt": msg.attempt,
            "label": msg.label,
        }
    message = decode_any(bytes(payload))  # validated by its class (bus.messages)
    if isinstance(message, PlanMessage):
        return "plan", {}  # not recorded: the plan is in the run's configuration
    kind = message.KIND
    # recorded in its one shape, as on the wire
    body: dict[str, Any] = {"v": codec.SCHEMA_VERSION, "kind": kind, **message.body()}
    if kind in ("level", "status"):  # which stage; whose status: a node's or the controller's
        body["topic"] = topic
    return kind, body


class Recorder:
    """Records the ``kinds`` of one pipe's messages (module docstring); in memory as
    :attr:`events`, and in ``path`` (JSON lines) when given."""

    def __init__(
        self,
        mqtt: MqttSettings,
        pipe: str,
        path: Path | None = None,
        *,
        kinds: Sequence[str] = KINDS,
    ) -> None:
        self.topics = Topics(pipe)
        self.kinds = frozenset(kinds)
        self.path = path
        self.events = Events()
        self.bad = 0  # messages that did not decode
        self.observer = Observer(mqtt, subscriptions_for(self.topics, kinds), self.on_observed)
        self._file: IO[str] | None = None

    @property
    def mqtt(self) -> MqttSettings:
        return self.observer.mqtt

    @property
    def ready(self) -> asyncio.Event:
        """Set once subscribed."""
        return self.observer.ready

    @contextlib.asynccontextmanager
    async def running(self, timeout: float = 20.0) -> AsyncIterator[Recorder]:
        """Record in the background while the block runs; subscribed on entry."""
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("w", encoding="utf-8")
        try:
            async with self.observer.running(timeout):
                yield self
        finally:
            if self._file is not None:
                self._file.close()
                self._file = None

    def on_observed(self, message: Observed) -> None:
        self.on_message(message.topic, message.payload, message.rx)

    def on_message(self, topic: str, payload: bytes | bytearray, rx: float) -> None:
        """Classify and record one message (public for tests and replays)."""
        if not payload and self.topics.camera_of(topic) is None:
            return  # a retained message being cleared
        try:
            kind, body = record_of(self.topics, topic, payload)
        except CodecError as exc:
            self.bad += 1
            log.debug("recorder: undecodable message on %s: %s", topic, exc)
            return
        if kind not in self.kinds:
            return
        body["rx"] = rx
        self._keep(kind, body)

    def _keep(self, kind: str, body: dict[str, Any]) -> None:
        self.events.add(kind, body)
        if self._file is not None:
            self._file.write(json.dumps({"event": kind, **body}) + "\n")

    def reset(self, keep: tuple[str, ...] = KEPT_AFTER_RESET) -> None:
        """Forget everything but ``keep`` (after a warm-up); the file gets a marker line."""
        for kind in list(self.events.by_kind):
            if kind not in keep:
                self.events.by_kind[kind] = []
        if self._file is not None:
            self._file.write(json.dumps({"event": "reset", "rx": time.time()}) + "\n")

    def completed(self) -> int:
        return len({r["request_id"] for r in self.events["result"]})

    def sent_ids(self) -> set[str]:
        return {s["request_id"] for s in self.events["send"]}


async def wait_until(
    predicate: Callable[[], bool],
    timeout: float = 20.0,
    what: str = "condition",
    *,
    check: Callable[[], None] | None = None,
    poll_s: float = 0.02,
) -> None:
    """Poll ``predicate()`` (typically over what a :class:`Recorder` saw) until it holds;
    ``check()`` runs at each poll and may raise (e.g. a child process died).

    Raises:
        TimeoutError: it did not hold within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if check is not None:
            check()
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(poll_s)
