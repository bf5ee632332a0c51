"""The camera: publishes images to stage 0 as an IoT camera trap would, and tracks results.

Each shot goes to its camera's own topic, ``stage/0/<camera>`` (:meth:`Topics.camera_stage`),
so that the secure broker can let user ``camera-<id>`` write only its own images.

Images come from the dataset's test split or a folder; send times come from a fixed rate or a
replayed trace. Each message carries a request id, the camera id, the capture time and, when
known, the true label (so accuracy can be tracked live).

Every accepted image is written to a :class:`~nodes.journal.RequestJournal` before it is
published; the camera subscribes to ``results``, marks requests done on their first result
(duplicates are counted and suppressed), and re-sends requests whose result has not come back
after ``resend_after_s``. At the end it waits for outstanding results up to ``drain_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bus.connection import MqttSettings
from bus.messages import ResultMessage
from bus.session import Received, Session
from bus.topics import Topics
from nodes.journal import RequestJournal
from pipeline import codec
from pipeline.errors import BrokerError, CodecError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shot:
    """One image to send: when (seconds after the start), from which camera, which image."""

    at_s: float
    camera: str
    index: int  # into the image source


@dataclass(frozen=True)
class ImageSource:
    """uint8 images [N, H, W(, C)] and optional true labels."""

    images: np.ndarray
    labels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.images)

    def label(self, i: int) -> int | None:
        return None if self.labels is None else int(self.labels[i % len(self.labels)])


def encode_image(pixels: np.ndarray, fmt: str) -> tuple[bytes, tuple[int, ...] | None]:
    """uint8 pixels -> (bytes, shape for raw). PNG and JPEG are what a real camera sends."""
    if fmt == "raw":
        return np.ascontiguousarray(pixels).tobytes(), tuple(int(s) for s in pixels.shape)
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG" if fmt == "png" else "JPEG", quality=90)
    return buf.getvalue(), None


def rate_schedule(
    rate_hz: float, count: int, cameras: Sequence[str] = ("cam0",), n_images: int = 1, seed: int = 0
) -> list[Shot]:
    """``count`` shots at a fixed rate, cameras in turn, images in a seeded order."""
    order = np.random.default_rng(seed).permutation(max(count, n_images)) % max(n_images, 1)
    return [Shot(i / rate_hz, cameras[i % len(cameras)], int(order[i])) for i in range(count)]


@dataclass
class CameraReport:
    sent: int = 0
    completed: int = 0
    resent: int = 0
    duplicates: int = 0
    lost: int = 0
    correct: int = 0
    labelled: int = 0
    latencies_s: list[float] = field(default_factory=list)
    results: dict[str, ResultMessage] = field(default_factory=dict)
    duration_s: float = 0.0

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None

    def summary(self) -> dict[str, Any]:
        lat = np.asarray(self.latencies_s) if self.latencies_s else None
        return {
            "sent": self.sent,
            "completed": self.completed,
            "lost": self.lost,
            "resent": self.resent,
            "duplicates_suppressed": self.duplicates,
            "accuracy": self.accuracy,
            "duration_s": self.duration_s,
            "p50_ms": float(np.percentile(lat, 50) * 1e3) if lat is not None else None,
            "p95_ms": float(np.percentile(lat, 95) * 1e3) if lat is not None else None,
        }


class Camera:
    """Publishes shots on schedule and tracks their results until all are in."""

    def __init__(
        self,
        mqtt: MqttSettings,
        pipe: str,
        source: ImageSource,
        shots: Sequence[Shot],
        *,
        image_format: str = "png",
        journal: RequestJournal | None = None,
        resend_after_s: float | None = 10.0,
        drain_s: float = 30.0,
        track_results: bool = True,
        run_id: str | None = None,
        on_result: Callable[[ResultMessage], None] | None = None,
    ) -> None:
        if image_format not in ("png", "jpeg", "raw"):
            raise ValueError(f"image format must be png, jpeg or raw, not {image_format!r}")
        self.mqtt = mqtt
        self.topics = Topics(pipe)
        self.source = source
        self.shots = sorted(shots, key=lambda s: s.at_s)
        self.image_format = image_format
        self.journal = journal or RequestJournal()
        self.resend_after_s = resend_after_s
        self.drain_s = drain_s
        self.track_results = track_results
        self.run_id = run_id or uuid.uuid4().hex[:8]
        self.on_result = on_result
        self.report = CameraReport()
        self._all_done = asyncio.Event()
        self._sent_all = False
        self.client_id = f"edgeprune-camera-{pipe}-{self.run_id}"[:64]
        # persistent: QoS 1 results sent while the camera reconnects are delivered when it is
        # back
        self._session = Session(
            mqtt,
            self.client_id,
            name="camera",
            clean_session=False,
            subscriptions=[(self.topics.results, 1)] if track_results else [],
            on_message=self._on_result,
        )

    async def run(
        self, stop: asyncio.Event | None = None, connect_timeout_s: float = 30.0
    ) -> CameraReport:
        stop = stop or asyncio.Event()
        started = time.monotonic()
        async with self._session as session:
            resender = asyncio.create_task(self._resend_loop(), name="camera-resend")
            try:
                try:
                    await asyncio.wait_for(session.connected.wait(), connect_timeout_s)
                except TimeoutError as exc:
                    raise BrokerError(
                        f"camera could not reach the broker at {self.mqtt.url} "
                        f"within {connect_timeout_s:.0f} s"
                    ) from exc
                await self._send_all(stop)
                self._sent_all = True
                self._check_done()
                if self.track_results and not stop.is_set():
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._wait_done_or_stop(stop), self.drain_s)
            finally:
                resender.cancel()
                await asyncio.gather(resender, return_exceptions=True)
        stats = self.journal.stats()
        self.report.resent = stats.resent
        self.report.duplicates = self.journal.duplicates
        self.report.lost = stats.pending if self.track_results else 0
        self.report.duration_s = time.monotonic() - started
        return self.report

    async def _publish(self, topic: str, payload: bytes) -> None:
        """Publish with QoS 1 through the session's outbox; returns once acknowledged."""
        await self._session.publish(topic, payload, qos=1)

    async def _wait_done_or_stop(self, stop: asyncio.Event) -> None:
        waiters = [asyncio.create_task(self._all_done.wait()), asyncio.create_task(stop.wait())]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()

    async def _send_all(self, stop: asyncio.Event) -> None:
        t0 = time.monotonic()
        last_log = t0
        for seq, shot in enumerate(self.shots):
            delay = t0 + shot.at_s - time.monotonic()
            if delay > 0:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
            if stop.is_set():
                break
            await self._send(seq, shot)
            if time.monotonic() - last_log > 5:
                last_log = time.monotonic()
                log.info(
                    "camera: sent %d/%d, results %d",
                    self.report.sent,
                    len(self.shots),
                    self.report.completed,
                )

    async def _send(self, seq: int, shot: Shot) -> None:
        i = shot.index % len(self.source)
        image, shape = encode_image(self.source.images[i], self.image_format)
        now = time.time()
        request_id = f"{shot.camera}-{self.run_id}-{seq:06d}"
        msg = codec.StageMessage(
            request_id=request_id,
            camera=shot.camera,
            stage=0,
            entry_ts=now,
            capture_ts=now,
            label=self.source.label(i),
            hops=(),
            image=image,
            image_format=self.image_format,
            image_shape=shape,
        )
        payload = codec.encode_stage(msg)
        self.journal.add(request_id, shot.camera, payload, now)
        await self._publish(self.topics.camera_stage(shot.camera), payload)
        self.report.sent += 1

    async def _resend_loop(self) -> None:
        if self.resend_after_s is None:
            return
        while True:
            await asyncio.sleep(min(1.0, self.resend_after_s / 4))
            for req in self.journal.due(self.resend_after_s):
                log.info(
                    "re-sending %s (attempt %d): no result after %.1f s",
                    req.request_id,
                    req.attempts + 1,
                    self.resend_after_s,
                )
                self.journal.mark_resent(req.request_id)
                await self._publish(self.topics.camera_stage(req.camera), req.payload)

    def _on_result(self, message: Received) -> None:
        if message.topic != self.topics.results:
            return
        try:
            result = ResultMessage.from_json(message.payload)
        except CodecError as exc:
            log.warning("ignoring a malformed result: %s", exc)
            return
        rid = result.request_id
        if not self.journal.complete(rid):
            return
        r = self.report
        r.completed += 1
        r.results[rid] = result
        if result.true_label is not None:
            r.labelled += 1
            r.correct += int(bool(result.correct))
        r.latencies_s.append(time.time() - result.entry_ts)
        if self.on_result:
            self.on_result(result)
        self._check_done()

    def _check_done(self) -> None:
        if self._sent_all and self.report.completed >= self.report.sent:
            self._all_done.set()


def load_source(
    dataset: str, data_dir: Path, split: str = "test", *, size: int = 28, channels: int = 1
) -> ImageSource:
    """Images with labels from the default dataset's split, or from a folder of images."""
    from pipeline.data import load_dataset, split_dataset

    ds = load_dataset(dataset, data_dir, size=size, channels=channels)
    part = getattr(split_dataset(ds), split) if dataset in ("animal-mnist", "default") else ds
    return ImageSource(part.images, part.labels)
