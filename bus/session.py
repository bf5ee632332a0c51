"""One service's connection to the broker: :class:`Session`, an async context manager.

A session owns one aiomqtt client at a time and one connection task, plus one short task per
message being published; leaving the ``async with`` says goodbye (the retained ``offline``
status), then cancels and awaits them.

- *Reconnects* with exponential backoff (:class:`Backoff`) for as long as it is open.
- *Presence.* With a :class:`Presence`, the client connects with the retained Last Will
  ``offline, "connection lost"`` and publishes the retained ``online`` status after each
  (re)connection, once its subscriptions are made. On the way out it publishes ``offline`` with
  the reason (``"shutdown"``, or :func:`~pipeline.errors.stop_reason` of the error) while still
  connected: a retained status never says online when the service is not.
- *Subscriptions* are remembered and made again after every reconnect (a broker that restarted
  without persistence has forgotten them), in the order they were first made.
- *Outbox.* :meth:`Session.publish` queues a message in an ordered :class:`Outbox` and, when
  connected and the window has room, hands it to the client at once (no hop through a
  publisher task: this is the per-message path of every service); messages go to the client
  in order, up to ``publish_window`` unacknowledged at a time. A message stays in the outbox
  until the broker acknowledged it (QoS 1); what the broker did not acknowledge when the
  connection was lost is published again, in order, after the reconnect (and what was
  published while disconnected, after that). QoS 1 is at least once: a message whose
  acknowledgement was lost may arrive twice.
- *Errors.* ``aiomqtt.MqttError`` stays inside this module: a lost connection is a reconnect,
  and a failed subscribe or direct publish is raised as :class:`~pipeline.errors.BusError`.
  A handler that raises anything else stops the session (``offline`` with the reason first)
  and the error comes out of :attr:`Session.task`.

Handlers are plain functions called on the event loop for each message (:class:`Received`);
they must not block. Anything they want to send goes through :meth:`Session.publish`.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Protocol

import aiomqtt

from bus.connection import MqttSettings
from bus.messages import NodeState
from pipeline.errors import BusError, stop_reason

log = logging.getLogger(__name__)

PUBLISH_WINDOW = 32  # QoS 1 messages handed to the client and not yet acknowledged
GOODBYE_TIMEOUT_S = 2.0  # how long the offline status may take on the way out


def raise_if_cancelling(exc: BaseException) -> None:
    """Call in a reconnect loop's ``except MqttError``: aiomqtt's ``__aexit__`` can turn a
    cancellation into an MqttError (a timed-out disconnect); when the task is being cancelled,
    shut down instead of reconnecting forever."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError from exc


class Publisher(Protocol):
    """What can publish one message: a :class:`Session` (queued in its outbox) or a client."""

    def publish(
        self, topic: str, payload: bytes, qos: int = ..., retain: bool = ...
    ) -> Awaitable[None]: ...


@dataclass(frozen=True)
class Received:
    """One message from the broker: its topic, its payload (empty: a cleared retained
    message) and whether the broker sent it as the retained message of its topic."""

    topic: str
    payload: bytes
    retain: bool = False


@dataclass(frozen=True)
class Presence:
    """The retained status of a service: its topic, and ``status(state, reason)``, the payload
    saying ``online`` or ``offline`` (called at each use, so it can carry current fields)."""

    topic: str
    status: Callable[[NodeState, str], bytes]


@dataclass
class Backoff:
    """Delays between reconnection attempts: ``first``, doubling up to ``maximum``; reset after
    a successful connection."""

    first: float = 0.2
    maximum: float = 5.0
    _next: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        if not 0 < self.first <= self.maximum:
            raise ValueError("need 0 < first <= maximum")
        self._next = self.first

    def next(self) -> float:
        delay = self._next
        self._next = min(self._next * 2, self.maximum)
        return delay

    def reset(self) -> None:
        self._next = self.first


@dataclass(eq=False)
class Outgoing:
    """A message in the outbox. ``handed_on``: the connection it was last handed to the
    client on (None: not yet, or to be handed again)."""

    seq: int
    topic: str
    payload: bytes
    qos: int
    retain: bool
    handed_on: int | None = None
    acknowledged: asyncio.Future[None] | None = None


class Outbox:
    """Messages not yet acknowledged, in the order they were published (pure: no I/O).

    The session asks :meth:`next_due` for the oldest message not handed over on the current
    connection: after a reconnect that is the oldest unacknowledged one, so the broker gets
    what it missed in the original order before anything newer. The messages due on the
    current connection are kept in a heap by sequence number, so finding the next one does
    not scan the messages in flight (stale entries are dropped when they reach the top)."""

    def __init__(self) -> None:
        self._items: dict[int, Outgoing] = {}  # by seq, in publish order
        self._due: list[int] = []  # heap: seqs that may be due on _connection
        self._connection: int | None = None
        self._seq = 0

    def __len__(self) -> int:
        return len(self._items)

    def add(self, topic: str, payload: bytes, qos: int, retain: bool) -> Outgoing:
        self._seq += 1
        item = Outgoing(self._seq, topic, payload, qos, retain)
        self._items[item.seq] = item
        heapq.heappush(self._due, item.seq)
        return item

    def next_due(self, connection: int) -> Outgoing | None:
        if connection != self._connection:  # a new connection: every message is due again
            self._connection = connection
            self._due = list(self._items)  # ascending: already a heap
        due = self._due
        while due:
            item = self._items.get(due[0])
            if item is not None and item.handed_on != connection:
                return item
            heapq.heappop(due)  # acknowledged, or handed over on this connection
        return None

    def handed(self, item: Outgoing, connection: int) -> None:
        item.handed_on = connection

    def retry(self, item: Outgoing) -> None:
        """The client refused or lost ``item``: hand it over again."""
        item.handed_on = None
        heapq.heappush(self._due, item.seq)

    def oldest(self) -> Outgoing | None:
        """The oldest message not yet acknowledged."""
        return next(iter(self._items.values()), None)

    def acknowledged(self, item: Outgoing) -> None:
        self._items.pop(item.seq, None)
        if item.acknowledged is not None and not item.acknowledged.done():
            item.acknowledged.set_result(None)

    def items(self) -> list[Outgoing]:
        return list(self._items.values())


class Session:
    """One service's connection (module docstring). Use as ``async with Session(...) as s:``."""

    def __init__(
        self,
        settings: MqttSettings,
        client_id: str | None = None,
        *,
        name: str = "session",
        clean_session: bool | None = None,
        presence: Presence | None = None,
        subscriptions: Iterable[tuple[str, int]] = (),
        on_message: Callable[[Received], None] | None = None,
        on_connect: Callable[[], Awaitable[None]] | None = None,
        reconnect_first_s: float = 0.2,
        reconnect_max_s: float = 5.0,
        publish_window: int = PUBLISH_WINDOW,
    ) -> None:
        self.settings = settings
        self.client_id = client_id
        self.name = name
        self.clean_session = clean_session
        self.presence = presence
        self.on_message = on_message
        self.on_connect = on_connect
        self.connected = asyncio.Event()  # subscribed and online (cleared when lost)
        self.connections = 0  # successful connections so far
        self._subscriptions: dict[str, int] = dict(subscriptions)
        self._backoff = Backoff(reconnect_first_s, reconnect_max_s)
        self._outbox = Outbox()
        self._window = publish_window
        self._client: aiomqtt.Client | None = None
        self._in_flight: dict[int, asyncio.Task[None]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._retained: dict[str, asyncio.Future[bytes]] = {}  # topic -> its retained message
        self._closed = False

    # ----------------------------------------------------------------- lifecycle
    async def __aenter__(self) -> Session:
        if self._tasks and not self._closed:
            raise RuntimeError(f"{self.name}: the session is already open")
        self._closed = False  # open (again: what is left in the outbox goes out then)
        self._tasks = [
            asyncio.create_task(self._connection_loop(), name=f"{self.name}-connection"),
        ]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        failed = exc is not None and not isinstance(exc, asyncio.CancelledError | GeneratorExit)
        await self.close(stop_reason(exc) if failed and exc is not None else "shutdown")

    @property
    def task(self) -> asyncio.Task[None]:
        """The connection task: it ends only with an error of a handler (or on close)."""
        if not self._tasks:
            raise RuntimeError(f"{self.name}: the session is not open")
        return self._tasks[0]

    async def wait_connected(self, timeout_s: float) -> None:
        """Wait until connected, subscribed and online.

        Raises:
            BusError: not connected within ``timeout_s``.
        """
        try:
            await asyncio.wait_for(self.connected.wait(), timeout_s)
        except TimeoutError as exc:
            raise BusError(
                f"{self.name}: broker {self.settings.url} not reachable within {timeout_s:g} s"
            ) from exc

    async def close(self, reason: str = "shutdown") -> None:
        """Say ``offline`` with ``reason`` (if connected), disconnect, end the tasks."""
        if self._closed:
            return
        self._closed = True
        await self._say_offline(reason)
        tasks = [*self._tasks, *self._in_flight.values()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.connected.clear()
        for item in self._outbox.items():
            if item.acknowledged is not None:
                item.acknowledged.cancel()

    async def _say_offline(self, reason: str) -> None:
        client = self._client
        if self.presence is None or client is None or not self.connected.is_set():
            return  # not connected: the broker has published the Last Will instead
        with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
            await asyncio.wait_for(
                client.publish(
                    self.presence.topic,
                    self.presence.status("offline", reason),
                    qos=1,
                    retain=True,
                ),
                GOODBYE_TIMEOUT_S,
            )

    # ----------------------------------------------------------------- sending
    def publish(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False
    ) -> asyncio.Future[None]:
        """Queue a message; it goes out in order, waiting out disconnections. The future is
        done when the broker acknowledged it (await it, or not)."""
        if self._closed:
            raise BusError(f"{self.name}: the session is closed")
        item = self._outbox.add(topic, payload, qos, retain)
        item.acknowledged = asyncio.get_running_loop().create_future()
        self._hand_over()
        return item.acknowledged

    async def publish_now(
        self, topic: str, payload: bytes, qos: int = 0, retain: bool = False
    ) -> bool:
        """Publish at once, outside the outbox (telemetry that is stale when late): False when
        not connected.

        Raises:
            BusError: the client failed to publish it.
        """
        client = self._client
        if client is None or not self.connected.is_set():
            return False
        try:
            await client.publish(topic, payload, qos=qos, retain=retain)
        except aiomqtt.MqttError as exc:
            raise BusError(f"{self.name}: publish to {topic} failed: {exc}") from exc
        return True

    @property
    def pending(self) -> int:
        """Messages published and not yet acknowledged."""
        return len(self._outbox)

    async def drain(self, timeout: float) -> bool:
        """Wait until the outbox is empty (up to ``timeout``); whether it is."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while (oldest := self._outbox.oldest()) is not None:
                    if oldest.acknowledged is None:
                        break
                    await asyncio.shield(oldest.acknowledged)
        return not self._outbox

    def _hand_over(self) -> None:
        """Hand the due messages to the client, oldest first, while connected and the window
        has room. Called whenever that may change: a message published, a connection made, a
        publish ended (acknowledged, refused or lost)."""
        client = self._client
        if client is None or not self.connected.is_set():
            return  # the next connection hands them over
        connection = self.connections
        while len(self._in_flight) < self._window:
            item = self._outbox.next_due(connection)
            if item is None:
                return
            self._outbox.handed(item, connection)
            # each task hands its message to the client before its first await, and tasks
            # start in the order they were created: messages leave in outbox order
            task = asyncio.create_task(self._publish_one(client, item, connection))
            self._in_flight[item.seq] = task

    async def _publish_one(self, client: aiomqtt.Client, item: Outgoing, connection: int) -> None:
        try:
            await client.publish(item.topic, item.payload, qos=item.qos, retain=item.retain)
        except aiomqtt.MqttError as exc:
            log.debug("%s: publish to %s failed (%s); again", self.name, item.topic, exc)
            if connection == self.connections:
                self._outbox.retry(item)  # still connected (e.g. a timeout): hand it again
        else:
            self._outbox.acknowledged(item)
        finally:
            if self._in_flight.get(item.seq) is asyncio.current_task():
                del self._in_flight[item.seq]
            if not self._closed:
                self._hand_over()  # a slot of the window is free (or the item is due again)

    # ----------------------------------------------------------------- receiving
    async def subscribe(self, topic: str, qos: int = 1) -> None:
        """Subscribe now if connected, and after every reconnect.

        Raises:
            BusError: the broker did not accept the subscription.
        """
        self._subscriptions[topic] = qos
        client = self._client
        if client is not None:
            try:
                await client.subscribe(topic, qos=qos)
            except aiomqtt.MqttError as exc:
                raise BusError(f"{self.name}: subscribe to {topic} failed: {exc}") from exc

    async def retained(self, topic: str, timeout_s: float) -> bytes | None:
        """The retained message of ``topic``, read by subscribing to it for a moment; None
        when none comes within ``timeout_s`` (the broker sends it at once if there is one).

        Raises:
            BusError: the subscription failed.
        """
        future = asyncio.get_running_loop().create_future()
        self._retained[topic] = future
        try:
            await self.subscribe(topic, qos=1)
            async with asyncio.timeout(timeout_s):
                return await future
        except TimeoutError:
            return None
        finally:
            self._retained.pop(topic, None)
            with contextlib.suppress(BusError):
                await self.unsubscribe(topic)

    async def unsubscribe(self, topic: str) -> None:
        """Stop receiving ``topic`` (now, and after reconnects).

        Raises:
            BusError: the broker did not answer.
        """
        self._subscriptions.pop(topic, None)
        client = self._client
        if client is not None:
            try:
                await client.unsubscribe(topic)
            except aiomqtt.MqttError as exc:
                raise BusError(f"{self.name}: unsubscribe from {topic} failed: {exc}") from exc

    async def _connection_loop(self) -> None:
        will = None
        if self.presence is not None:
            will = aiomqtt.Will(
                self.presence.topic,
                self.presence.status("offline", "connection lost"),
                qos=1,
                retain=True,
            )
        while True:
            client = aiomqtt.Client(
                **self.settings.aiomqtt_kwargs(),
                identifier=self.client_id,
                clean_session=self.clean_session,
                will=will,
                logger=logging.getLogger("aiomqtt"),
            )
            try:
                async with client:
                    await self._serve(client)
            except aiomqtt.MqttError as exc:
                raise_if_cancelling(exc)
                delay = self._backoff.next()
                log.warning(
                    "%s: broker %s unreachable (%s); reconnecting in %.1f s",
                    self.name,
                    self.settings.url,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)

    async def _serve(self, client: aiomqtt.Client) -> None:
        self._client = client
        self.connections += 1
        self._backoff.reset()
        try:
            for topic, qos in list(self._subscriptions.items()):
                await client.subscribe(topic, qos=qos)
            if self.on_connect is not None:
                await self.on_connect()
            if self.presence is not None:
                await client.publish(
                    self.presence.topic, self.presence.status("online", ""), qos=1, retain=True
                )
            self.connected.set()
            self._hand_over()  # what was published while disconnected, in order
            async for message in client.messages:
                payload = message.payload
                body = bytes(payload) if isinstance(payload, bytes | bytearray) else b""
                received = Received(str(message.topic), body, bool(message.retain))
                waiter = self._retained.get(received.topic)
                if waiter is not None and received.retain and not waiter.done():
                    waiter.set_result(body)
                if self.on_message is not None:
                    self.on_message(received)
        except Exception as exc:
            if not isinstance(exc, aiomqtt.MqttError):
                # leaving `async with` disconnects cleanly, so no Last Will: say it
                await self._say_offline(stop_reason(exc))
            raise
        finally:
            self._lost()

    def _lost(self) -> None:
        """The connection is gone: what was handed over and not acknowledged goes again."""
        self.connected.clear()
        self._client = None
        for task in list(self._in_flight.values()):
            task.cancel()
