"""What ``edgeprune top`` shows: a live view of one pipeline built from its JSON topics.

:class:`PipelineView` ingests decoded messages (status, metrics, exits, results, levels,
decisions, errors) and renders a plain-text screen; it reads no clock and does no I/O, so it
is tested without a broker. :func:`show` feeds it from a :class:`bus.observer.Observer` and
redraws it until stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bus.connection import MqttSettings
from bus.messages import (
    DecisionMessage,
    ErrorMessage,
    ExitMessage,
    JsonMessage,
    MetricsMessage,
    ResultMessage,
    StatusMessage,
    decode_any,
)
from bus.observer import Observed, Observer, subscriptions_for
from bus.topics import Topics
from pipeline.errors import CodecError

VIEWED_KINDS = ("result", "exit", "level", "decision", "status", "metrics", "error")


@dataclass
class NodeRow:
    """What top knows of one node: its last status and its last metrics message."""

    node: str
    state: str = "?"
    stage: int | None = None
    metrics: MetricsMessage | None = None
    seen: float = 0.0


@dataclass
class PipelineView:
    pipe: str
    slo_s: float | None = None
    window: int = 500  # latencies kept for the percentiles
    nodes: dict[str, NodeRow] = field(default_factory=dict)
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=500))
    results: int = 0
    correct: int = 0
    labelled: int = 0
    errors: int = 0
    last_decision: str = ""
    last_error: str = ""
    exit_times: deque[float] = field(default_factory=lambda: deque(maxlen=2000))

    def ingest(self, message: JsonMessage, now: float) -> None:
        if isinstance(message, StatusMessage):
            row = self._row(message.node)
            row.state = message.state
            row.stage = message.stage
            row.seen = now
        elif isinstance(message, MetricsMessage):
            row = self._row(message.node)
            row.state = "online" if row.state == "?" else row.state
            row.stage = message.stage
            row.metrics = message
            row.seen = now
        elif isinstance(message, ExitMessage):
            self.latencies.append(message.latency_s)
            self.exit_times.append(now)
        elif isinstance(message, ResultMessage):
            self.results += 1
            if message.correct is not None:
                self.labelled += 1
                self.correct += int(message.correct)
        elif isinstance(message, DecisionMessage):
            self.last_decision = (
                f"{message.action or message.policy} -> levels "
                f"{list(message.levels)} ({message.reason})"
            )
        elif isinstance(message, ErrorMessage):
            self.errors += 1
            self.last_error = f"{message.node}: {message.reason}"

    def on_message(self, message: Observed) -> None:
        """Ingest one observed message of this pipe; one that does not decode is skipped."""
        if not message.payload or Topics(self.pipe).camera_of(message.topic) is not None:
            return  # a cleared retained message, or an image
        with contextlib.suppress(CodecError):
            self.ingest(decode_any(message.payload), message.rx)

    def _row(self, node: str) -> NodeRow:
        if node not in self.nodes:
            self.nodes[node] = NodeRow(node)
        return self.nodes[node]

    def throughput(self, now: float, span_s: float = 10.0) -> float:
        recent = [t for t in self.exit_times if now - t <= span_s]
        return len(recent) / span_s

    def render(self, now: float) -> str:
        lat = np.asarray(self.latencies) if self.latencies else None
        lines = [
            f"edgeprune top — pipe '{self.pipe}'"
            + (f", SLO {self.slo_s * 1e3:.0f} ms" if self.slo_s else "")
        ]
        if lat is not None:
            p50, p95, p99 = (float(np.percentile(lat, q)) * 1e3 for q in (50, 95, 99))
            slo = ""
            if self.slo_s:
                slo = f"   SLO met {100 * float(np.mean(lat <= self.slo_s)):.1f}%"
            lines.append(
                f"latency (last {len(lat)}): p50 {p50:.0f} ms  p95 {p95:.0f} ms  "
                f"p99 {p99:.0f} ms{slo}   throughput {self.throughput(now):.1f}/s"
            )
        else:
            lines.append("latency: no exits yet")
        acc = f"{100 * self.correct / self.labelled:.1f}%" if self.labelled else "-"
        lines.append(f"results {self.results}   live accuracy {acc}   errors {self.errors}")
        lines.append("")
        header = (
            f"{'node':<12}{'state':<9}{'stage':>5}{'level':>6}{'ratio':>6}{'queue':>6}"
            f"{'svc ms':>8}{'done':>8}{'err':>5}{'shed':>5}{'emul':>6}{'age s':>7}"
        )
        lines += [header, "-" * len(header)]
        for row in sorted(
            self.nodes.values(), key=lambda r: (r.stage is None, r.stage or 0, r.node)
        ):
            m = row.metrics
            service = None if m is None or m.service_s is None else 1e3 * m.service_s
            lines.append(
                f"{row.node:<12}{row.state:<9}{_f(row.stage):>5}"
                f"{_f(m and m.level):>6}{_f(m and m.ratio, '.1f'):>6}{_f(m and m.queue_depth):>6}"
                f"{_f(service, '.1f'):>8}{m.processed if m else 0:>8}"
                f"{m.errors if m else 0:>5}{m.shed if m else 0:>5}"
                f"{'x' + format(m.emulated_factor if m else 1.0, 'g'):>6}{now - row.seen:>7.1f}"
            )
        if self.last_decision:
            lines += ["", f"last decision: {self.last_decision}"]
        if self.last_error:
            lines.append(f"last error: {self.last_error}")
        return "\n".join(lines)


async def show(
    mqtt: MqttSettings,
    view: PipelineView,
    write: Callable[[str], None],
    stop: asyncio.Event,
    *,
    interval_s: float = 1.0,
    once_s: float | None = None,
    clear: bool = False,
) -> None:
    """Feed ``view`` from the broker and ``write`` a screen every ``interval_s`` until
    ``stop`` (``clear``: each screen replaces the last, for a terminal); with ``once_s``,
    collect that long, write one screen and return."""
    observer = Observer(mqtt, subscriptions_for(Topics(view.pipe), VIEWED_KINDS), view.on_message)
    async with observer.running():
        if once_s is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), once_s)
            observer.raise_if_failed()
            write(view.render(time.time()) + "\n")
            return
        while not stop.is_set():
            write(("\x1b[H\x1b[2J" if clear else "\n") + view.render(time.time()) + "\n")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), interval_s)
            observer.raise_if_failed()


def _f(value: Any, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)
