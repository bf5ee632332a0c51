"""The harness's live status line, over the records of its :class:`~bus.observer.Recorder`.

The harness records every run with :class:`bus.observer.Recorder` (the reports read its
:class:`~bus.observer.Events`): what the cameras sent, results, exits, levels, decisions, statuses, metrics and errors, each
with its receipt time, in memory and in ``events.jsonl``.

:class:`LiveStatus` turns the records into one status line per second: levels, the latency of
the last seconds, SLO attainment so far, and which slowdowns are in force.
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
from collections import Counter
from collections.abc import Sequence
from typing import IO, Any

import numpy as np

from bus.messages import LevelMessage
from bus.observer import Events, Recorder
from experiment.config import NodeSpec


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
