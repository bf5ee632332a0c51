"""Helpers shared by the integration tests: in-process pipelines on a real broker, a results
collector (the observer's recorder), and polling with a deadline (never a fixed sleep)."""

from __future__ import annotations

import contextlib
import os
import queue
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np

from bus.connection import MqttSettings
from bus.messages import LevelMessage
from bus.observer import Recorder
from bus.observer import wait_until as wait_until
from bus.topics import Topics
from nodes.node import running_nodes as running_nodes
from pipeline import codec
from pipeline.calibration import Calibration, SliceLatency
from pipeline.calibration.accuracy import LogisticAccuracyFit
from pipeline.calibration.latency import LinearFit
from pipeline.calibration.measure import block_inputs
from pipeline.calibration.slimedge import (
    CostTable,
    Measurements,
    SliceBank,
    contiguous_ranges,
    measure_costs,
)
from pipeline.checkpoint import Checkpoint

COLLECTED_KINDS = ("result", "exit", "error", "status", "metrics", "decision", "level")
# A valid body of every JSON message kind (bus.messages), for tests that publish real ones.
GOOD: dict[str, dict[str, Any]] = {
    "result": {
        "request_id": "r1",
        "camera": "cam0",
        "label": "dog",
        "label_index": 4,
        "score": 0.9,
        "true_label": 4,
        "correct": True,
        "levels": [0, 1],
        "attempt": 0,
        "entry_ts": 1.0,
    },
    "exit": {
        "request_id": "r1",
        "camera": "cam0",
        "capture_ts": 1.0,
        "entry_ts": 1.0,
        "exit_ts": 1.5,
        "latency_s": 0.5,
        "attempt": 0,
        "correct": None,
        "stages": [{"stage": 0, "node": "n0", "queue_s": 0.0, "compute_s": 0.01, "level": 0}],
    },
    "level": {"stage": 0, "level": 3, "ratio": 0.3, "seq": 1, "reason": "prune"},
    "plan": {
        "version": 1,
        "num_blocks": 5,
        "reason": "",
        "stages": [
            {"stage": 0, "start": 0, "end": 3, "node": "n0"},
            {"stage": 1, "start": 3, "end": 5, "node": "n1"},
        ],
    },
    "decision": {
        "seq": 1,
        "at": 2.0,
        "ts": 3.0,
        "policy": "reactive",
        "objective": "bottleneck",
        "action": "prune",
        "reason": "slow",
        "how": "optimizer",
        "levels_before": [0, 0],
        "levels": [3, 1],
        "changed": [0, 1],
        "feasible": True,
        "slo_s": 0.05,
    },
    "status": {
        "node": "n0",
        "state": "online",
        "reason": "",
        "stage": 0,
        "bounds": [0, 3],
        "ts": 1.0,
    },
    "metrics": {
        "node": "n0",
        "stage": 0,
        "bounds": [0, 3],
        "level": 1,
        "ratio": 0.1,
        "queue_depth": 2,
        "service_s": 0.01,
        "compute_s": 0.005,
        "received": 10,
        "processed": 9,
        "errors": 0,
        "shed": 0,
        "level_changes": 1,
        "plan_version": -1,
        "emulated_factor": 1.0,
        "emulation": "none",
        "uptime_s": 3.0,
        "ts": 4.0,
    },
    "error": {
        "node": "n0",
        "stage": 1,
        "topic": "edgeprune/p/stage/1",
        "request_id": None,
        "reason": "malformed msgpack",
        "bytes": 13,
        "shed": False,
        "ts": 1.0,
    },
}


def good_json(kind: str, **changes: Any) -> bytes:
    """A valid ``kind`` message (its body from :data:`GOOD`, with ``changes``) on the wire."""
    return codec.encode_json(kind, {**GOOD[kind], **changes})


REPO = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("EDGEPRUNE_DATA_DIR", REPO / "data"))


class Collector(Recorder):
    """A :class:`bus.observer.Recorder` of a pipe's JSON kinds, with one list per kind in
    arrival order (each body carries ``rx``, its receipt time)."""

    def __init__(self, mqtt: MqttSettings, pipe: str) -> None:
        super().__init__(mqtt, pipe, kinds=COLLECTED_KINDS)

    @property
    def results(self) -> list[dict[str, Any]]:
        return self.events["result"]

    @property
    def exits(self) -> list[dict[str, Any]]:
        return self.events["exit"]

    @property
    def errors(self) -> list[dict[str, Any]]:
        return self.events["error"]

    @property
    def statuses(self) -> list[dict[str, Any]]:
        return self.events["status"]

    @property
    def metrics(self) -> list[dict[str, Any]]:
        return self.events["metrics"]

    @property
    def decisions(self) -> list[dict[str, Any]]:
        return self.events["decision"]

    @property
    def levels(self) -> list[tuple[str, dict[str, Any]]]:
        """(topic, body) of every level message (``control/stage/<i>``, ``control/view/<v>``)."""
        return [(body["topic"], body) for body in self.events["level"]]

    def result_counts(self) -> Counter[str]:
        return Counter(r["request_id"] for r in self.results)


@contextlib.asynccontextmanager
async def collecting(mqtt: MqttSettings, pipe: str) -> AsyncIterator[Collector]:
    """A :class:`Collector`, subscribed, for the duration of the block."""
    async with Collector(mqtt, pipe).running(timeout=10) as col:
        yield col


async def publish_level(
    mqtt: MqttSettings,
    pipe: str,
    stage: int,
    level: int,
    ratio: float,
    seq: int = 1,
    reason: str = "test",
) -> None:
    async with aiomqtt.Client(**mqtt.aiomqtt_kwargs()) as client:
        await client.publish(
            Topics(pipe).control_stage(stage),
            LevelMessage(stage=stage, level=level, ratio=ratio, seq=seq, reason=reason).to_json(),
            qos=1,
            retain=True,
        )


async def clear_retained(mqtt: MqttSettings, pipe: str, topics: Sequence[str]) -> None:
    async with aiomqtt.Client(**mqtt.aiomqtt_kwargs()) as client:
        for topic in topics:
            await client.publish(topic, b"", qos=1, retain=True)


class LineReader:
    """Reads a text stream's lines in a thread, so a test can wait for one with a deadline
    (``select`` on a buffered text pipe misses lines already read into the buffer)."""

    def __init__(self, stream: Any) -> None:
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream: Any) -> None:
        for line in iter(stream.readline, ""):
            self._queue.put(line)
        self._queue.put(None)

    def until(self, predicate: Callable[[str], bool], timeout: float) -> list[str]:
        """Collect lines until one satisfies ``predicate``; fail on timeout or end of stream."""
        deadline = time.monotonic() + timeout
        while not any(predicate(line) for line in self.lines):
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    f"timed out after {timeout} s; printed: {self.lines}"
                ) from None
            if line is None:
                raise AssertionError(f"the stream ended; printed: {self.lines}")
            self.lines.append(line)
        return self.lines


def node_process(args: Sequence[str], log_path: Path) -> subprocess.Popen[bytes]:
    """`edgeprune node ...` as a separate process (its output goes to ``log_path``)."""
    out = open(log_path, "ab")  # noqa: SIM115 - closed with the process by the caller
    return subprocess.Popen(
        [sys.executable, "-m", "edgeprune", "node", *args],
        stdout=out,
        stderr=subprocess.STDOUT,
        cwd=REPO,
    )


def stop_process(proc: subprocess.Popen[Any], timeout: float = 60.0) -> int:
    """SIGTERM (after SIGCONT, in case it is stopped), then SIGKILL if it does not exit."""
    import signal

    if proc.poll() is not None:
        return proc.returncode
    proc.send_signal(signal.SIGCONT)
    proc.terminate()
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        raise


def stand_in_costs(
    checkpoint: Checkpoint, *, runs: int = 5, warmup: int = 1
) -> tuple[CostTable, list[tuple[int, int]], np.ndarray]:
    """Real per-block costs (single-block variants, briefly timed), the contiguous slice
    ranges, and a stand-in accuracy per range and ratio whose loss grows with ratio and slice
    length (0.98 unpruned)."""
    bank = SliceBank(checkpoint)
    costs, _ = measure_costs(
        bank,
        block_inputs(bank.model, checkpoint.calibration_tensor(2)),
        runs=runs,
        warmup=warmup,
        ranges=False,
    )
    ranges = contiguous_ranges(costs.n_blocks)
    acc = np.asarray([[0.98 - 0.02 * r * (j - i) for r in costs.ratios] for i, j in ranges])
    return costs, ranges, acc


def stand_in_measurements(checkpoint: Checkpoint) -> Measurements:
    """:func:`stand_in_costs` as the measurements file the planner loads (no combos:
    kappa = 1)."""
    costs, ranges, acc = stand_in_costs(checkpoint)
    return Measurements(
        checkpoint.config.name,
        checkpoint.model_hash(),
        checkpoint.config.num_classes,
        costs,
        tuple(ranges),
        np.zeros_like(acc),
        acc,
        (),
    )


def nominal_calibration(
    checkpoint: Checkpoint, bounds: Sequence[tuple[int, int]], ratios: Sequence[float]
) -> Calibration:
    """A nominal calibration of a partition, for a controller that only observes (``--policy
    static``): the re-planning side, where there is one, uses the measurements."""
    fit = LinearFit(a=-0.01, b=0.01, r2=1.0)
    slices = tuple(
        SliceLatency(i, a, b, "test", tuple((r, fit.predict(r)) for r in ratios), fit)
        for i, (a, b) in enumerate(bounds)
    )
    accuracy = LogisticAccuracyFit(g=tuple(-2.0 for _ in bounds), d=-4.0, max_abs_error=0.0)
    return Calibration(
        tuple(ratios),
        slices,
        (),
        accuracy,
        checkpoint.model_hash(),
        "test",
        checkpoint.config.num_classes,
    )
