"""The multi-view topology on MQTT: one branch node per view and a fusion node.

    camera of view v --image--> edgeprune/<pipe>/view/<v>          msgpack, stage 0, QoS 1
    branch node v: run branch v at its level, mean-pool
                      --features--> edgeprune/<pipe>/fusion/<v>    msgpack, stage 1, QoS 1
    fusion node: element-wise max over the views that arrived, classifier
                      --label--> edgeprune/<pipe>/results          JSON "result", QoS 1
    per-view level:   edgeprune/<pipe>/control/view/<v>            JSON "level", retained
    liveness:         edgeprune/<pipe>/nodes/<node>/status         JSON, retained, Last Will

A features message carries the kept channels of the pooled feature ``[1, k]``, their indices
(``channels``) and the full width, the request id, camera, label and ``meta = {view, level}``.

The fusion node waits for a request's views up to ``timeout_s`` after its first view arrived,
then fuses what it has. A view that missed ``fail_after`` fusions in a row is *failed*: it is
dropped, and fusion no longer waits for it (results then come without the timeout's delay);
a failed view that delivers again is waited for again. A view arriving after its request was
fused is counted as late and ignored. Every request that reached the fusion node with at least
one view gets exactly one result, which names the views fused and the views missing (or, when
its features are so large that the fused output is not finite, one error on ``errors``).

Bad input (a message that does not decode, NaN or infinite features, a wrong view) is reported
on ``errors`` in the slice nodes' format and the service serves on; whatever fails while
handling one message is reported the same way. A service that stops on an error publishes its
retained status ``offline`` with the reason first.

Computation is small (a branch is ~1 MMAC) and runs on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from bus.connection import MqttSettings
from bus.messages import ErrorMessage, LevelMessage, NodeState, ResultMessage, StatusMessage
from bus.session import Presence, Publisher, Received, Session
from bus.topics import ViewTopics
from pipeline import codec
from pipeline.errors import BusError, CodecError, internal_error
from pipeline.multiview import PrunedMultiView

log = logging.getLogger(__name__)


def view_message(request_id: str, camera: str, crop: np.ndarray, label: int | None = None) -> bytes:
    """A camera's stage-0 message carrying one view (raw uint8 pixels)."""
    now = time.time()
    return codec.encode_stage(
        codec.StageMessage(
            request_id=request_id,
            camera=camera,
            stage=0,
            entry_ts=now,
            capture_ts=now,
            label=label,
            image=np.ascontiguousarray(crop, dtype=np.uint8).tobytes(),
            image_format="raw",
            image_shape=tuple(int(s) for s in crop.shape),
        )
    )


def level_message(view: int, level: int, ratio: float, reason: str = "") -> bytes:
    """The retained level of view ``view``: a ``level`` message whose ``stage`` is the view."""
    return LevelMessage(stage=view, level=level, ratio=ratio, reason=reason).to_json()


class _Service:
    """One :class:`~bus.session.Session` (Last Will, retained status, reconnects with backoff)
    serving :meth:`handle` until stopped."""

    def __init__(self, mqtt: MqttSettings, pipe: str, node_id: str) -> None:
        self.mqtt, self.node_id = mqtt, node_id
        self.topics = ViewTopics(pipe)
        self.session: Session | None = None
        self.ready = asyncio.Event()  # subscribed and online (set once)

    def subscriptions(self) -> list[tuple[str, int]]:
        raise NotImplementedError

    def handle(self, topic: str, payload: bytes) -> list[tuple[str, bytes]]:
        """Process one message; returns (topic, payload) pairs to publish (QoS 1)."""
        raise NotImplementedError

    def _status(self, state: NodeState, reason: str) -> bytes:
        return StatusMessage(
            node=self.node_id, state=state, ts=time.time(), reason=reason
        ).to_json()

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Serve until ``stop`` is set; the session reconnects with backoff when the broker
        goes away, and says ``offline`` (``shutdown``, or the error) on the way out."""
        stop = stop or asyncio.Event()
        self.session = Session(
            self.mqtt,
            name=self.node_id,
            presence=Presence(self.topics.base.status(self.node_id), self._status),
            subscriptions=self.subscriptions(),
            on_message=self._on_message,
            reconnect_max_s=5.0,
        )
        async with self.session as session:
            waiters = [
                asyncio.create_task(stop.wait()),
                asyncio.create_task(self._signal_ready(session)),
            ]
            try:
                await asyncio.wait([session.task, waiters[0]], return_when=asyncio.FIRST_COMPLETED)
                if session.task.done():
                    session.task.result()  # a handler's error: stop with it
            finally:
                for t in waiters:
                    t.cancel()
                await asyncio.gather(*waiters, return_exceptions=True)

    async def _signal_ready(self, session: Session) -> None:
        await session.connected.wait()
        self.ready.set()

    def _on_message(self, message: Received) -> None:
        topic, payload = message.topic, message.payload
        try:
            out = self.handle(topic, payload)
        except Exception as exc:  # last resort: one message must never stop the service
            log.exception("%s: failed to handle a message on %s", self.node_id, topic)
            out = [self.error(internal_error(exc), topic, payload)]
        for reply_topic, body in out:
            self._send(reply_topic, body)

    def error(
        self, reason: str, topic: str, payload: bytes, request_id: str | None = None
    ) -> tuple[str, bytes]:
        """The ``errors`` message (the slice nodes' format) for an input this service refused."""
        log.warning("%s: rejected a message on %s: %s", self.node_id, topic, reason)
        error = ErrorMessage(
            node=self.node_id,
            topic=topic,
            reason=reason,
            ts=time.time(),
            request_id=request_id,
            size=len(payload),
        )
        return self.topics.base.errors, error.to_json()

    def _send(self, topic: str, body: bytes) -> None:
        """Queue ``body`` in the session's outbox (QoS 1, in order, across reconnects)."""
        if self.session is None:
            return
        try:
            self.session.publish(topic, body, qos=1)
        except BusError:  # a fusion timer that fired while the service was stopping
            log.debug("%s: stopped; not publishing on %s", self.node_id, topic)


class BranchNode(_Service):
    """Runs view ``view``'s branch at its level (``control/view/<v>``, retained)."""

    def __init__(
        self,
        mqtt: MqttSettings,
        pipe: str,
        view: int,
        model: PrunedMultiView,
        node_id: str | None = None,
    ) -> None:
        super().__init__(mqtt, pipe, node_id or f"view{view}")
        self.view, self.model, self.level = view, model, 0
        self.served = 0
        self.errors = 0
        self.spec = model.ckpt.config.views[view]

    def subscriptions(self) -> list[tuple[str, int]]:
        return [(self.topics.control(self.view), 1), (self.topics.view(self.view), 1)]

    def handle(self, topic: str, payload: bytes) -> list[tuple[str, bytes]]:
        try:
            if topic == self.topics.control(self.view):
                level = LevelMessage.from_json(payload).level_of(len(self.model.ratios))
                self.level = level
                log.info("view %d: level %d", self.view, level)
                return []
            msg = codec.decode_stage(payload)
            if (
                msg.image is None
                or msg.image_format != "raw"
                or msg.image_shape != (self.spec.size, self.spec.size)
            ):
                raise CodecError(
                    f"view {self.view} expects raw {self.spec.size}x{self.spec.size} pixels",
                    msg.request_id,
                )
        except CodecError as exc:
            self.errors += 1
            return [self.error(exc.reason, topic, payload, exc.request_id)]
        pixels = np.frombuffer(msg.image, dtype=np.uint8).reshape(msg.image_shape)
        started = time.perf_counter()
        feat, channels = self.model.branch(
            self.view, self.model.ckpt.preprocess(pixels[None]), self.level
        )
        hop = codec.Hop(
            stage=0,
            node=self.node_id,
            queue_s=0.0,
            compute_s=time.perf_counter() - started,
            level=self.level,
        )
        out = codec.StageMessage(
            request_id=msg.request_id,
            camera=msg.camera,
            stage=1,
            entry_ts=msg.entry_ts,
            capture_ts=msg.capture_ts,
            label=msg.label,
            hops=(hop,),
            tensor=feat.numpy().astype(np.float32),
            channels=None if channels is None else channels.to(torch.int32).numpy(),
            full_channels=self.model.width,
            meta={"view": self.view, "level": self.level},
        )
        self.served += 1
        return [(self.topics.features(self.view), codec.encode_stage(out))]


@dataclass
class _Pending:
    first: float
    outputs: list[tuple[torch.Tensor, torch.Tensor | None] | None]
    levels: list[int | None]
    msg: codec.StageMessage
    timer: asyncio.TimerHandle | None = None


@dataclass
class FusionStats:
    fused: int = 0
    partial: int = 0
    late: int = 0
    errors: int = 0
    missed: list[int] = field(default_factory=list)  # per view: fusions it missed


class FusionNode(_Service):
    """Max-fuses the views of each request (module docstring)."""

    def __init__(
        self,
        mqtt: MqttSettings,
        pipe: str,
        model: PrunedMultiView,
        *,
        timeout_s: float = 0.5,
        fail_after: int = 3,
        node_id: str = "fusion",
        remember: int = 10_000,
    ) -> None:
        super().__init__(mqtt, pipe, node_id)
        self.model, self.timeout_s, self.fail_after = model, timeout_s, fail_after
        self.n_views = len(model.branches)
        self.pending: dict[str, _Pending] = {}
        self.done: OrderedDict[str, None] = OrderedDict()
        self.remember = remember
        self.misses = [0] * self.n_views  # consecutive fusions each view missed
        self.stats = FusionStats(missed=[0] * self.n_views)
        self.results: list[ResultMessage] = []

    @property
    def failed(self) -> list[int]:
        return [v for v in range(self.n_views) if self.misses[v] >= self.fail_after]

    def subscriptions(self) -> list[tuple[str, int]]:
        return [(self.topics.features_all, 1)]

    def handle(self, topic: str, payload: bytes) -> list[tuple[str, bytes]]:
        try:
            msg = codec.decode_stage(payload)
            v = msg.meta.get("view")
            if (
                not isinstance(v, int)
                or not 0 <= v < self.n_views
                or msg.tensor is None
                or topic != self.topics.features(v)
            ):
                raise CodecError("features must name their view and carry a tensor", msg.request_id)
        except CodecError as exc:
            self.stats.errors += 1
            return [self.error(exc.reason, topic, payload, exc.request_id)]
        rid = msg.request_id
        if self.misses[v] >= self.fail_after:
            log.info("fusion: view %d is back", v)
        self.misses[v] = 0  # a late view is alive: wait for it again
        if rid in self.done:
            self.stats.late += 1
            return []
        p = self.pending.get(rid)
        if p is None:
            p = self.pending[rid] = _Pending(
                time.monotonic(), [None] * self.n_views, [None] * self.n_views, msg
            )
        channels = None if msg.channels is None else torch.from_numpy(msg.channels.astype(np.int64))
        p.outputs[v] = (torch.from_numpy(np.array(msg.tensor, copy=True)), channels)
        level = msg.meta.get("level")
        p.levels[v] = int(level) if isinstance(level, int) else None
        waiting = [u for u in range(self.n_views) if p.outputs[u] is None and u not in self.failed]
        if not waiting:
            whole = all(o is not None for o in p.outputs)
            return self._fuse(rid, "all views" if whole else "failed views dropped")
        if p.timer is None:
            p.timer = asyncio.get_running_loop().call_later(self.timeout_s, self._expire, rid)
        return []

    def _expire(self, rid: str) -> None:
        for topic, body in self._fuse(rid, "timeout"):
            self._send(topic, body)

    def _fuse(self, rid: str, why: str) -> list[tuple[str, bytes]]:
        """Fuse request ``rid`` now; ``why``: all views, timeout, or failed views dropped."""
        p = self.pending.pop(rid, None)
        if p is None:
            return []
        if p.timer is not None:
            p.timer.cancel()
        self.done[rid] = None
        while len(self.done) > self.remember:
            self.done.popitem(last=False)
        present = [v for v in range(self.n_views) if p.outputs[v] is not None]
        missing = [v for v in range(self.n_views) if p.outputs[v] is None]
        newly_failed = False
        for v in missing:
            self.misses[v] += 1
            self.stats.missed[v] += 1
            if self.misses[v] == self.fail_after:
                log.warning(
                    "fusion: view %d failed (missed %d in a row); dropped", v, self.fail_after
                )
                newly_failed = True
        out = [self._result(rid, p, present, missing, why)]
        if newly_failed:  # requests that now only wait for failed views go at once
            for other in [
                r
                for r, q in self.pending.items()
                if all(q.outputs[u] is not None or u in self.failed for u in range(self.n_views))
            ]:
                out += self._fuse(other, "failed views dropped")
        return out

    def _result(
        self, rid: str, p: _Pending, present: list[int], missing: list[int], why: str
    ) -> tuple[str, bytes]:
        """The result of a fused request, or an error when its fused output is not finite."""
        fused = self.model.fuse(p.outputs)
        if not bool(torch.isfinite(fused).all()):
            self.stats.errors += 1
            reason = "the fused output is not finite (feature values too large?)"
            return self.error(reason, self.topics.features_all, b"", rid)
        probs = torch.softmax(fused[0], dim=0)
        index = int(probs.argmax())
        names = self.model.ckpt.config.trunk.class_names
        self.stats.fused += 1
        self.stats.partial += bool(missing)
        result = ResultMessage(
            request_id=rid,
            camera=p.msg.camera,
            label=names[index] if names else str(index),
            label_index=index,
            score=round(float(probs.max()), 5),
            true_label=p.msg.label,
            correct=None if p.msg.label is None else p.msg.label == index,
            levels=tuple(p.levels),
            entry_ts=p.msg.entry_ts,
            views=tuple(present),
            missing=tuple(missing),
            fused_on=why,
            waited_s=time.monotonic() - p.first,
        )
        self.results.append(result)
        return self.topics.base.results, result.to_json()


async def publish_view_levels(
    client: Publisher,
    pipe: str,
    levels: Sequence[int],
    ratios: Sequence[float],
    reason: str = "planner",
) -> None:
    """Retained per-view levels (e.g. from :func:`controller.slimedge.view_levels`)."""
    topics = ViewTopics(pipe)
    for v, level in enumerate(levels):
        await client.publish(
            topics.control(v), level_message(v, level, ratios[level], reason), qos=1, retain=True
        )
