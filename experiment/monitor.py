"""The harness's own MQTT subscriber: records every message of one run, and prints live status.

:class:`Recorder` subscribes to the pipe's ``stage/0/+`` (what the camera sent: request id and
entry time), ``results``, ``exits``, ``control/#`` (levels and decisions), ``nodes/+/status``,
``nodes/+/metrics`` and ``errors/#``. Every JSON message is kept in memory and appended to an
``events.jsonl`` file with the time it was received (``rx``), so a report can be recomputed
from the file alone (:func:`load_events`). Stage tensors past stage 0 are never subscribed to.

:class:`LiveStatus` turns the records into one status line per second: levels, the latency of
the last seconds, SLO attainment so far, and which slowdowns are in force.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aiomqtt
import numpy as np

from bus.connection import MqttSettings
from bus.messages import LevelMessage, PlanMessage, decode_any
from bus.topics import Topics
from experiment.config import NodeSpec
from pipeline import codec
from pipeline.errors import CodecError

log = logging.getLogger(__name__)

KINDS = ("send", "result", "exit", "level", "decision", "status", "metrics", "error")


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
                    by_kind={
                        k: v
                        for k, v in events.by_kind.items()
                        if k in ("status", "level", "decision")
                    }
                )
                continue
            events.add(kind, item)
    return events


class Recorder:
    """Subscribes to one pipe and records its messages (see the module docstring)."""

    def __init__(self, mqtt: MqttSettings, pipe: str, path: Path | None = None) -> None:
        self.mqtt = mqtt
        self.topics = Topics(pipe)
        self.path = path
        self.events = Events()
        self.ready = asyncio.Event()
        self.bad = 0
        self._file: IO[str] | None = None

    @contextlib.asynccontextmanager
    async def running(self, timeout: float = 20.0) -> AsyncIterator[Recorder]:
        """Record in the background while the block runs; subscribed on entry."""
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("w", encoding="utf-8")
        task = asyncio.create_task(self._run(), name="recorder")
        try:
            waiter = asyncio.create_task(self.ready.wait())
            done, _ = await asyncio.wait(
                [waiter, task], timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            waiter.cancel()
            if task in done:
                task.result()  # raises the connection error
            if not self.ready.is_set():
                raise TimeoutError(f"the recorder could not subscribe at {self.mqtt.url}")
            yield self
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            if self._file is not None:
                self._file.close()
                self._file = None

    async def _run(self) -> None:
        t = self.topics
        async with aiomqtt.Client(
            **self.mqtt.aiomqtt_kwargs(), logger=logging.getLogger("aiomqtt")
        ) as client:
            for topic, qos in (
                (t.camera_stage_all, 1),
                (t.results, 1),
                (t.exits, 1),
                (f"{t.base}/control/#", 1),
                (t.status_all, 1),
                (t.metrics_all, 0),
                (t.errors_all, 1),
            ):
                await client.subscribe(topic, qos=qos)
            self.ready.set()
            async for message in client.messages:
                self.on_message(str(message.topic), message.payload, time.time())

    def on_message(self, topic: str, payload: Any, rx: float) -> None:
        """Classify and record one message (public for tests and replays)."""
        data = bytes(payload) if isinstance(payload, bytes | bytearray) else b""
        try:
            if self.topics.camera_of(topic) is not None:
                msg = codec.decode_stage(data)
                self._keep(
                    "send",
                    {
                        "request_id": msg.request_id,
                        "camera": msg.camera,
                        "entry_ts": msg.entry_ts,
                        "attempt": msg.attempt,
                        "label": msg.label,
                        "rx": rx,
                    },
                )
                return
            if not data:
                return  # a retained message being cleared
            message = decode_any(data)
        except CodecError as exc:
            self.bad += 1
            log.debug("recorder: undecodable message on %s: %s", topic, exc)
            return
        if isinstance(message, PlanMessage):
            return  # the plan is in the run's configuration
        kind = message.KIND
        # recorded in its one shape (bus.messages), as on the wire, plus when it came
        body = {"v": codec.SCHEMA_VERSION, "kind": kind, **message.body(), "rx": rx}
        if kind == "level":
            body["topic"] = topic
        self._keep(kind, body)

    def _keep(self, kind: str, body: dict[str, Any]) -> None:
        self.events.add(kind, body)
        if self._file is not None:
            self._file.write(json.dumps({"event": kind, **body}) + "\n")

    def reset(self, keep: tuple[str, ...] = ("status", "level", "decision")) -> None:
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


def current_levels(events: Events, n_stages: int) -> list[int]:
    """The latest level of each stage seen on control/stage/<i> (0 before any)."""
    levels = [0] * n_stages
    for body in events["level"]:
        message = LevelMessage.from_body(body)
        if message.stage < n_stages:
            levels[message.stage] = message.level
    return levels


class LiveStatus:
    """One status line per interval from a :class:`Recorder`'s records."""

    def __init__(
        self,
        recorder: Recorder,
        nodes: Sequence[NodeSpec],
        slo_ms: float,
        *,
        label: str = "",
        stream: IO[str] | None = None,
        recent_s: float = 5.0,
    ) -> None:
        self.recorder = recorder
        self.nodes = list(nodes)
        self.slo_s = slo_ms / 1e3
        self.label = label
        self.stream = stream or sys.stderr
        self.recent_s = recent_s
        self.clock_start: float | None = None
        self.expected: int | None = None
        self._seen_levels = 0
        self._events: list[str] = []

    def line(self, now: float) -> str:
        ev = self.recorder.events
        exits = _first_by_id(ev["exit"])
        lat = np.asarray([e["latency_s"] for e in exits.values()])
        recent = np.asarray(
            [e["latency_s"] for e in exits.values() if e.get("rx", 0) >= now - self.recent_s]
        )
        sent = len(self.recorder.sent_ids())
        t = now - self.clock_start if self.clock_start is not None else math.nan
        levels = current_levels(ev, len(self.nodes))
        slow = [
            f"{n.name} x{n.emulation.factor_at(t):g}"
            for n in self.nodes
            if math.isfinite(t) and n.emulation.factor_at(t) != n.emulation.factor
        ]
        correct = Counter(
            bool(r.get("correct"))
            for r in _first_by_id(ev["result"]).values()
            if r.get("correct") is not None
        )
        labelled = sum(correct.values())
        parts = [
            f"{self.label}t={t:5.0f}s" if math.isfinite(t) else f"{self.label}t=  -- ",
            f"sent {sent}" + (f"/{self.expected}" if self.expected else ""),
            f"done {len(exits)}",
            f"p95(last {self.recent_s:.0f}s) "
            + (f"{np.percentile(recent, 95) * 1e3:5.0f} ms" if recent.size else "   -- ms"),
            "SLO ok "
            + (f"{100 * float(np.mean(lat <= self.slo_s)):5.1f}%" if lat.size else "   --"),
            "acc " + (f"{100 * correct[True] / labelled:4.1f}%" if labelled else "--"),
            "levels " + "/".join(str(v) for v in levels),
        ]
        if slow:
            parts.append("slow: " + ", ".join(slow))
        return "  ".join(parts)

    def new_level_events(self) -> list[str]:
        """Human lines for level changes seen since the last call."""
        levels = self.recorder.events["level"]
        out = []
        for body in levels[self._seen_levels :]:
            t = body["rx"] - self.clock_start if self.clock_start is not None else math.nan
            message = LevelMessage.from_body(body)
            out.append(
                f"{self.label}t={t:5.1f}s  stage {message.stage} -> level "
                f"{message.level} (ratio {message.ratio}): {message.reason}"
            )
        self._seen_levels = len(levels)
        return out

    async def run(self, interval_s: float = 1.0) -> None:
        """Print until cancelled: a line per interval (rewritten in place on a terminal) and a
        permanent line for every level change."""
        tty = self.stream.isatty()
        every = interval_s if tty else max(interval_s, 5.0)
        last = 0.0
        try:
            while True:
                now = time.time()
                for text in self.new_level_events():
                    self._write(text, tty, final=True)
                if now - last >= every:
                    self._write(self.line(now), tty, final=not tty)
                    last = now
                await asyncio.sleep(interval_s / 4)
        finally:
            if tty:
                self.stream.write("\n")
                self.stream.flush()

    def _write(self, text: str, tty: bool, final: bool) -> None:
        if tty:
            self.stream.write("\r\x1b[2K" + text + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


def _first_by_id(items: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The first message per request id (a re-sent request may finish twice)."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        out.setdefault(str(item.get("request_id")), item)
    return out
