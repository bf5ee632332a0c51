"""The slice node: an asyncio service that runs one slice of the model on one device.

    subscribe stage/<i> (stage 0: stage/0/+, one topic per camera) -> bounded local queue
        -> worker thread runs the slice at its level
        -> publish stage/<i+1>, or (last stage) results + exits

One :class:`SliceNode` owns one :class:`~bus.session.Session` (the connection: reconnects,
Last Will and retained status, resubscription, the ordered outbox) and two tasks (worker,
metrics); :meth:`SliceNode.run` cancels and awaits all of them on exit.

- Requests are processed in arrival order. The slice runs in a single worker thread, so the
  event loop stays responsive (control messages, metrics, pings) while it computes.
- A level change (retained ``control/stage/<i>``) is a reference swap that takes effect at the
  next request: no request is dropped or half-processed.
- Outputs go through the session's outbox, which survives reconnects: a result computed while
  the broker is away, or not acknowledged when it went, is published once the node is back.
- The session is persistent (fixed client id, clean_session false), so QoS 1 messages sent to
  the node while it reconnects are delivered when it returns.
- When the local queue is full, a new request is shed: it is reported on ``errors/<node>``
  with its request id and counted in metrics; never silently dropped.
- Bad input (malformed msgpack, wrong shape or dtype, NaN or infinite values, unknown schema
  version, oversized payload, an image that does not decode, a level or plan it cannot apply)
  is reported on ``errors/<node>``; the node serves on. A bad retained message (level, plan) is
  reported once per distinct payload, not again on every reconnect. Whatever goes wrong with
  one message is caught at its loop (intake, worker) and reported: it never stops the node.
- A node that stops on an error publishes its retained status ``offline`` with the reason
  before it leaves the broker (the Last Will covers only a lost connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from bus.connection import MqttSettings
from bus.messages import (
    ErrorMessage,
    ExitMessage,
    LevelMessage,
    MetricsMessage,
    NodeState,
    PlanMessage,
    ResultMessage,
    StatusMessage,
)
from bus.session import Presence, Received, Session
from bus.topics import Topics, camera_level
from nodes.config import NodeConfig
from nodes.stage_input import image_to_tensor, tensor_from_message
from pipeline import codec
from pipeline.checkpoint import Checkpoint, load_checkpoint
from pipeline.errors import (
    BusError,
    CodecError,
    ConfigError,
    EdgepruneError,
    internal_error,
)
from pipeline.models import SliceableResNet
from pipeline.placement import SliceBounds
from pipeline.pruning import PrunableSlice
from pipeline.reference import build_prunable

log = logging.getLogger(__name__)

BAD_RETAINED_REMEMBERED = 64  # distinct bad level/plan payloads remembered (reported once)


@dataclass
class _Request:
    msg: codec.StageMessage
    received: float  # perf_counter when it arrived


@dataclass
class _Counters:
    received: int = 0
    processed: int = 0
    errors: int = 0
    shed: int = 0
    level_changes: int = 0
    plan_changes: int = 0


class SliceNode:
    """Runs one slice of a checkpoint's model as an MQTT service."""

    def __init__(self, config: NodeConfig, checkpoint: Checkpoint | None = None) -> None:
        self.config = config
        self.topics = Topics(config.pipe)
        self.ckpt = checkpoint or load_checkpoint(config.checkpoint)
        self.model: SliceableResNet = self.ckpt.build()
        self.num_blocks = self.model.num_blocks
        self.stage: int | None = config.stage
        self.slice: PrunableSlice | None = None
        self._built: dict[SliceBounds, PrunableSlice] = {}
        self._queue: asyncio.Queue[_Request] = asyncio.Queue()
        self._placed = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slice")
        self._placing: set[asyncio.Task[None]] = set()  # plans being applied
        self._lock = threading.Lock()
        self._counters = _Counters()
        self._service_s: deque[float] = deque(maxlen=50)
        self._compute_s: deque[float] = deque(maxlen=50)
        self._started = time.time()
        self._clock0 = config.clock_start if config.clock_start is not None else self._started
        self._plan_version = -1  # the plan this node runs: advances once its slice is built
        self._plan_wanted = -1  # the newest plan accepted (being built, or applied)
        self._bad_retained: OrderedDict[tuple[str, bytes], None] = OrderedDict()
        self._busy = False
        self._subscribed_stage: int | None = None
        self.ready = asyncio.Event()  # placed, built and subscribed
        if config.bounds is not None and config.stage is not None:
            self._place(config.stage, config.bounds)
        # persistent (fixed client id, clean_session false): QoS 1 messages sent to the node
        # while it reconnects are delivered when it returns
        self._session = Session(
            config.mqtt,
            f"edgeprune-{config.pipe}-{config.node_id}"[:64],
            name=f"node {config.node_id}",
            clean_session=False,
            presence=Presence(self.topics.status(config.node_id), self._status),
            subscriptions=[(self.topics.plan, 1)],
            on_message=self._dispatch,
            on_connect=self._on_connect,
            reconnect_max_s=config.reconnect_max_s,
        )
        torch.set_num_threads(config.threads)
        gc.freeze()  # the built variants are long-lived: keep them out of every collection

    # ----------------------------------------------------------------- placement
    def _build(self, bounds: SliceBounds) -> PrunableSlice:
        if bounds.end > self.num_blocks:
            raise ConfigError(f"slice {bounds} exceeds the model's {self.num_blocks} blocks")
        if bounds not in self._built:
            started = time.perf_counter()
            self._built[bounds] = build_prunable(
                self.ckpt,
                bounds,
                ratios=self.config.ratios,
                round_to=self.config.round_to,
                recalibrate_bn=self.config.recalibrate_bn
                and self.ckpt.calibration_images is not None,
                model=self.model,
            )
            log.info(
                "built slice [%d, %d) at %d levels in %.0f ms",
                bounds.start,
                bounds.end,
                len(self.config.ratios),
                (time.perf_counter() - started) * 1e3,
            )
        return self._built[bounds]

    def _place(self, stage: int, bounds: SliceBounds) -> None:
        new = self._build(bounds)  # already built when the plan was applied off the loop
        if self.slice is not None and new is not self.slice:
            new.set_level(0)
        self.slice, self.stage = new, stage
        self._placed.set()

    @property
    def connected(self) -> asyncio.Event:
        """Set while the node is connected, subscribed and online."""
        return self._session.connected

    @property
    def is_last(self) -> bool:
        return self.slice is not None and self.slice.model_slice.is_last

    # ----------------------------------------------------------------- lifecycle
    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Serve until ``stop`` is set (or the task is cancelled)."""
        stop = stop or asyncio.Event()
        try:
            # the session is left last: it says offline (with the reason of an error) once
            # nothing of the node can publish any more
            async with self._session as session:
                tasks = [
                    asyncio.create_task(self._worker(), name="worker"),
                    asyncio.create_task(self._metrics_loop(), name="metrics"),
                    asyncio.create_task(stop.wait(), name="stop"),
                ]
                try:
                    done, _ = await asyncio.wait(
                        [session.task, *tasks], return_when=asyncio.FIRST_COMPLETED
                    )
                    for t in done:
                        exc = None if t is tasks[-1] else t.exception()
                        if exc is not None:
                            log.error(
                                "node %s stops: its %s task failed",
                                self.config.node_id,
                                t.get_name(),
                                exc_info=exc,
                            )
                            raise exc
                    await self._drain(timeout=5.0)
                finally:
                    placing = list(self._placing)
                    for t in [*tasks, *placing]:
                        t.cancel()
                    await asyncio.gather(*tasks, *placing, return_exceptions=True)
        finally:
            self._executor.shutdown(wait=False, cancel_futures=True)

    async def _drain(self, timeout: float) -> None:
        """On shutdown: let the request in progress finish and its outputs go out."""
        deadline = time.monotonic() + timeout
        while self._busy and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await self._session.drain(max(0.0, deadline - time.monotonic()))

    def _status(self, state: NodeState, reason: str = "") -> bytes:
        return StatusMessage(
            node=self.config.node_id,
            state=state,
            ts=time.time(),
            reason=reason,
            stage=self.stage,
            bounds=self._bounds(),
        ).to_json()

    def _bounds(self) -> tuple[int, int] | None:
        """The blocks ``[start, end)`` this node serves, None while it is not placed."""
        if self.slice is None:
            return None
        return self.slice.model_slice.bounds.start, self.slice.model_slice.bounds.end

    async def _on_connect(self) -> None:
        """After the session's (re)subscriptions, before its ``online`` status."""
        log.info("node %s connected to %s", self.config.node_id, self.config.mqtt.url)
        await self._subscribe_stage()
        if self._subscribed_stage is not None:
            self.ready.set()

    async def _subscribe_stage(self) -> None:
        """Subscribe to the stage's input and level (the session keeps them across reconnects)."""
        if self.stage is None or self._subscribed_stage == self.stage:
            return
        session = self._session
        if self._subscribed_stage is not None:
            await session.unsubscribe(self.topics.stage_input(self._subscribed_stage))
            await session.unsubscribe(self.topics.control_stage(self._subscribed_stage))
        await session.subscribe(self.topics.control_stage(self.stage), qos=1)
        await session.subscribe(self.topics.stage_input(self.stage), qos=1)
        self._subscribed_stage = self.stage
        log.info(
            "node %s serves stage %d, blocks [%d, %d)",
            self.config.node_id,
            self.stage,
            self.slice.model_slice.bounds.start if self.slice else -1,
            self.slice.model_slice.bounds.end if self.slice else -1,
        )

    # ----------------------------------------------------------------- intake
    def _dispatch(self, message: Received) -> None:
        topic, payload = message.topic, message.payload
        try:
            if topic == self.topics.plan:
                self._on_plan(bytes(payload))
            elif self.stage is not None and topic == self.topics.control_stage(self.stage):
                self._on_level(bytes(payload))
            elif self.stage is not None and self._is_input(topic):
                self._on_stage(payload, topic)
        except Exception as exc:  # last resort: one message must never stop the node
            log.exception("failed to handle a message on %s", topic)
            self._reject(internal_error(exc), None, topic, len(payload))

    def _is_input(self, topic: str) -> bool:
        if self.stage == 0:
            return self.topics.camera_of(topic) is not None
        return topic == self.topics.stage(self.stage or 0)

    def _on_stage(self, payload: bytes | bytearray, topic: str) -> None:
        self._counters.received += 1
        try:
            msg = codec.decode_stage(payload, max_bytes=self.config.max_payload_bytes)
            if msg.stage != self.stage:
                raise CodecError(
                    f"message for stage {msg.stage} arrived on stage {self.stage}", msg.request_id
                )
            _check_camera(self.topics, topic, msg)
        except CodecError as exc:
            self._reject(exc.reason, exc.request_id, topic, len(payload))
            return
        if self._queue.qsize() >= self.config.queue_size:
            self._counters.shed += 1
            self._reject(
                f"queue full ({self.config.queue_size}): request shed",
                msg.request_id,
                topic,
                len(payload),
                shed=True,
            )
            return
        self._queue.put_nowait(_Request(msg, time.perf_counter()))

    def _on_level(self, payload: bytes) -> None:
        topic = self.topics.control_stage(self.stage or 0)
        if not payload:  # the retained level was cleared: back to the start level
            if self.slice is not None and self.slice.level != 0:
                self.slice.set_level(0)
                self._counters.level_changes += 1
            log.info("stage %s: retained level cleared; level 0 (unpruned)", self.stage)
            return
        if self._known_bad(topic, payload):
            return  # reported when it first came; the level stays
        try:
            message = LevelMessage.from_json(payload)
            if self.slice is None:
                return
            level = message.level_of(len(self.slice.ratios))
        except CodecError as exc:
            self._reject_retained(f"bad control message: {exc}", topic, payload)
            return
        self.slice.set_level(level)
        self._counters.level_changes += 1
        log.info(
            "stage %s: level %d (ratio %.2f), seq %s, reason: %s",
            self.stage,
            level,
            self.slice.ratios[level],
            message.seq,
            message.reason,
        )

    def _on_plan(self, payload: bytes) -> None:
        topic = self.topics.plan
        if not payload:
            log.info("retained plan cleared; node %s keeps its placement", self.config.node_id)
            return
        if self._known_bad(topic, payload):
            return  # reported when it first came
        try:
            plan = PlanMessage.from_json(payload)
        except (CodecError, ConfigError) as exc:
            self._reject_retained(f"bad plan: {exc}", topic, payload)
            return
        if plan.num_blocks != self.num_blocks:
            # its stages would not cover this model: the last one would send to a stage
            # nobody serves, and every request would vanish
            self._reject_retained(
                f"bad plan: v{plan.version} is for a model of {plan.num_blocks} blocks; this "
                f"node's model has {self.num_blocks}; {self._serving()}",
                topic,
                payload,
            )
            return
        if plan.version <= self._plan_wanted:
            return
        self._plan_wanted = plan.version
        placement = plan.placement_of(self.config.node_id)
        if placement is None:
            self._plan_version = plan.version
            if self.config.stage is None:
                log.info(
                    "plan v%d has no stage for node %s; idle", plan.version, self.config.node_id
                )
            return
        stage, bounds = placement
        if (
            self.slice is not None
            and stage == self.stage
            and bounds == self.slice.model_slice.bounds
        ):
            self._plan_version = plan.version
            return
        # Build off the event loop (in the slice thread, after the request it is computing):
        # metrics, heartbeats, control messages and SIGTERM are served meanwhile, and the
        # requests already queued for the old slice are still computed by it.
        task = asyncio.get_running_loop().create_task(
            self._apply_placement(plan.version, stage, bounds, payload)
        )
        self._placing.add(task)
        task.add_done_callback(self._placing.discard)

    async def _apply_placement(
        self, version: int, stage: int, bounds: SliceBounds, payload: bytes
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._build, bounds)
        except Exception as exc:  # a ConfigError, or e.g. MemoryError on a small device
            log.exception(
                "cannot build blocks [%d, %d) for plan v%d", bounds.start, bounds.end, version
            )
            if self._plan_wanted == version:
                self._plan_wanted = self._plan_version  # a corrected plan may reuse the version
            reason = exc if isinstance(exc, EdgepruneError) else f"{type(exc).__name__}: {exc}"
            self._reject_retained(
                f"cannot apply plan v{version}: {reason}; {self._serving()}",
                self.topics.plan,
                payload,
            )
            return
        if version != self._plan_wanted:
            return  # a newer plan came while building; it places the node
        self._place(stage, bounds)
        self._plan_version = version
        self._counters.plan_changes += 1
        log.info(
            "plan v%d applied: stage %d, blocks [%d, %d)", version, stage, bounds.start, bounds.end
        )
        with contextlib.suppress(BusError):  # a reconnect subscribes again
            await self._subscribe_stage()
        if self._session.connected.is_set():
            self.ready.set()

    def _serving(self) -> str:
        """What the node keeps doing after refusing a plan, for the error's reason."""
        if self.slice is None:
            return "the node stays idle"
        b = self.slice.model_slice.bounds
        return f"still serving blocks [{b.start}, {b.end}) as stage {self.stage}"

    def _known_bad(self, topic: str, payload: bytes) -> bool:
        """Whether this exact payload on ``topic`` was already rejected."""
        key = _retained_key(topic, payload)
        if key in self._bad_retained:
            self._bad_retained.move_to_end(key)
            log.debug("ignored a bad message on %s, reported before", topic)
            return True
        return False

    def _reject_retained(self, reason: str, topic: str, payload: bytes) -> None:
        """Reject a level or plan message once per distinct payload: being retained, it comes
        again on every reconnect, and that is no new error."""
        key = _retained_key(topic, payload)
        self._bad_retained[key] = None
        while len(self._bad_retained) > BAD_RETAINED_REMEMBERED:
            self._bad_retained.popitem(last=False)
        self._reject(reason, None, topic, len(payload))

    def _reject(
        self, reason: str, request_id: str | None, topic: str, size: int, shed: bool = False
    ) -> None:
        if not shed:
            self._counters.errors += 1
        log.warning(
            "rejected %s (%d bytes) on %s: %s",
            request_id or "message",
            size,
            topic,
            reason,
            extra=self._log_extra(request_id),
        )
        error = ErrorMessage(
            node=self.config.node_id,
            topic=topic,
            reason=reason,
            ts=time.time(),
            stage=self.stage,
            request_id=request_id,
            size=size,
            shed=shed,
        )
        self._session.publish(
            self.topics.node_errors(self.config.node_id), error.to_json(), 1, False
        )

    # ----------------------------------------------------------------- work
    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            req = await self._queue.get()
            self._busy = True
            try:
                await self._process(req, loop)
            except Exception as exc:  # last resort: the worker serves on, whatever happened
                log.exception("failed to serve %s", req.msg.request_id)
                self._reject(
                    internal_error(exc),
                    req.msg.request_id,
                    self.topics.stage(self.stage or 0),
                    0,
                )
            finally:
                self._busy = False

    async def _process(self, req: _Request, loop: asyncio.AbstractEventLoop) -> None:
        slice_ = self.slice
        if slice_ is None:
            return
        started = time.perf_counter()
        t_sched = time.time() - self._clock0
        try:
            out, compute_s, cpu_s = await loop.run_in_executor(
                self._executor, self._compute, slice_, req.msg
            )
        except (CodecError, ConfigError) as exc:
            self._reject(str(exc), req.msg.request_id, self.topics.stage(self.stage or 0), 0)
            return
        # scale the thread's CPU time, not wall time: on a shared host, preemption of this
        # process must not be multiplied by the emulated factor
        wait = self.config.emulation.extra_wait(t_sched, cpu_s)
        if wait > 0:
            await asyncio.sleep(wait)
        service_s = time.perf_counter() - started
        self._compute_s.append(compute_s)
        self._service_s.append(service_s)
        self._counters.processed += 1
        hop = codec.Hop(
            stage=self.stage or 0,
            node=self.config.node_id,
            queue_s=started - req.received,
            compute_s=service_s,
            level=slice_.level,
        )
        self._emit(req.msg, out, hop, slice_)
        log.debug(
            "served %s at level %d: queue %.1f ms, service %.1f ms",
            req.msg.request_id,
            slice_.level,
            hop.queue_s * 1e3,
            service_s * 1e3,
            extra=self._log_extra(req.msg.request_id),
        )

    def _log_extra(self, request_id: str | None) -> dict[str, Any]:
        """Structured fields for ``--log-format json``."""
        return {
            "request_id": request_id,
            "node": self.config.node_id,
            "stage": self.stage,
            "pipe": self.config.pipe,
        }

    def _compute(self, slice_: PrunableSlice, msg: codec.StageMessage) -> tuple[Any, float, float]:
        t0, c0 = time.perf_counter(), time.thread_time()
        if slice_.model_slice.is_first:
            x = image_to_tensor(msg, self.ckpt.preprocess)
            out = slice_(x)
        else:
            x, channels = tensor_from_message(msg, slice_.model_slice.in_shape)
            out = slice_(x, channels, msg.hops[-1].level if msg.hops else None)
        if not bool(torch.isfinite(out.tensor).all()):
            raise CodecError(
                "the slice's output is not finite (input values too large?)", msg.request_id
            )
        return out, time.perf_counter() - t0, time.thread_time() - c0

    def _emit(
        self, msg: codec.StageMessage, out: Any, hop: codec.Hop, slice_: PrunableSlice
    ) -> None:
        hops = (*msg.hops, hop)
        if slice_.model_slice.is_last:
            probs = torch.softmax(out.tensor[0], dim=0)
            score, index = float(probs.max()), int(probs.argmax())
            names = self.ckpt.config.class_names
            now = time.time()
            correct = None if msg.label is None else msg.label == index
            result = ResultMessage(
                request_id=msg.request_id,
                camera=msg.camera,
                label=names[index] if names else str(index),
                label_index=index,
                score=round(score, 5),
                true_label=msg.label,
                correct=correct,
                levels=tuple(h.level for h in hops),
                entry_ts=msg.entry_ts,
                attempt=msg.attempt,
            ).to_json()
            exit_ = ExitMessage(
                request_id=msg.request_id,
                camera=msg.camera,
                capture_ts=msg.capture_ts,
                entry_ts=msg.entry_ts,
                exit_ts=now,
                latency_s=now - msg.entry_ts,
                stages=hops,
                attempt=msg.attempt,
                correct=correct,
            ).to_json()
            # both encoded before either is queued: nothing goes out half-emitted
            self._session.publish(self.topics.results, result, 1, False)
            self._session.publish(self.topics.exits, exit_, 1, False)
            return
        tensor = out.tensor.contiguous().numpy()
        channels = out.channels.to(torch.int32).numpy() if out.channels is not None else None
        nxt = codec.StageMessage(
            request_id=msg.request_id,
            camera=msg.camera,
            stage=(self.stage or 0) + 1,
            entry_ts=msg.entry_ts,
            capture_ts=msg.capture_ts,
            label=msg.label,
            hops=hops,
            tensor=tensor,
            channels=channels,
            full_channels=out.full_channels,
            attempt=msg.attempt,
        )
        self._session.publish(
            *(
                self.topics.stage((self.stage or 0) + 1),
                codec.encode_stage(nxt, float16=self.config.float16),
                1,
                False,
            )
        )

    # ----------------------------------------------------------------- telemetry
    def metrics(self) -> MetricsMessage:
        """The node's telemetry: what ``nodes/<node>/metrics`` carries."""

        def median(xs: deque[float]) -> float | None:
            return sorted(xs)[len(xs) // 2] if xs else None

        s = self.slice
        now = time.time()
        return MetricsMessage(
            node=self.config.node_id,
            ts=now,
            stage=self.stage,
            bounds=self._bounds(),
            level=s.level if s else None,
            ratio=s.ratios[s.level] if s else None,
            queue_depth=self._queue.qsize() + (1 if self._busy else 0),
            service_s=median(self._service_s),
            compute_s=median(self._compute_s),
            received=self._counters.received,
            processed=self._counters.processed,
            errors=self._counters.errors,
            shed=self._counters.shed,
            level_changes=self._counters.level_changes,
            plan_version=self._plan_version,
            emulated_factor=self.config.emulation.factor_at(now - self._clock0),
            emulation=self.config.emulation.describe(),
            uptime_s=max(0.0, now - self._started),
        )

    async def _metrics_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.metrics_interval_s)
            with contextlib.suppress(BusError):  # telemetry: stale when late, not queued
                await self._session.publish_now(
                    self.topics.metrics(self.config.node_id),
                    self.metrics().to_json(),
                    qos=0,
                )


@contextlib.asynccontextmanager
async def running_nodes(
    ckpt: Checkpoint,
    mqtt: MqttSettings,
    pipe: str,
    bounds: Sequence[SliceBounds],
    **config: Any,
) -> AsyncIterator[list[SliceNode]]:
    """Slice nodes ``n0, n1, ...`` (one per bounds) as tasks of this event loop, each with its own
    session; entered once all are ready, stopped on exit. ``config``: further
    :class:`~nodes.config.NodeConfig` fields."""
    nodes = [
        SliceNode(
            NodeConfig(node_id=f"n{i}", pipe=pipe, stage=i, bounds=b, mqtt=mqtt, **config), ckpt
        )
        for i, b in enumerate(bounds)
    ]
    stop = asyncio.Event()
    tasks = [asyncio.create_task(n.run(stop)) for n in nodes]
    try:
        await asyncio.wait_for(asyncio.gather(*(n.ready.wait() for n in nodes)), 60)
        yield nodes
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)


def _check_camera(topics: Topics, topic: str, msg: codec.StageMessage) -> None:
    """A stage-0 message must come on its own camera's topic: the secure broker lets camera
    ``<id>`` write only ``stage/0/<id>``, so this is what stops it speaking for another camera.

    Raises:
        CodecError: the message's camera is not the topic's.
    """
    level = topics.camera_of(topic)
    if level is not None and camera_level(msg.camera) != level:
        raise CodecError(
            f"camera {msg.camera!r} in a message on camera {level!r}'s topic", msg.request_id
        )


def _retained_key(topic: str, payload: bytes) -> tuple[str, bytes]:
    """How a bad retained message is remembered: its topic and a digest of its payload."""
    return topic, hashlib.blake2b(payload, digest_size=16).digest()
