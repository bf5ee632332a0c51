"""bus/observer.py against the real Mosquitto: what the recorder keeps from real messages, how
an observer stops (count, timeout, stop event) and fails (no broker), and the tools built on it
(`edgeprune tap`, `edgeprune top`, the hop bench's timed hop)."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bench.hop import measure_hops
from broker.launcher import MosquittoBroker
from bus.connection import MqttSettings
from bus.observer import KINDS, Observed, Observer, Recorder, load_events
from bus.session import Session
from bus.topics import Topics
from pipeline import codec
from pipeline.errors import BrokerError
from tests.helpers import REPO, LineReader, clear_retained, good_json, stop_process, wait_until


def _image_message(rid: str, camera: str, entry_ts: float, label: int) -> bytes:
    return codec.encode_stage(
        codec.StageMessage(
            rid, camera, 0, entry_ts, entry_ts - 0.5, label=label, image=b"png", image_format="png"
        )
    )


def _tensor_message(rid: str) -> bytes:
    x = np.zeros((1, 4, 2, 2), np.float32)
    return codec.encode_stage(codec.StageMessage(rid, "cam", 1, 1.0, 1.0, tensor=x))


# One message of every kind the recorder keeps, as (topic, payload) of pipe `t`.
def _one_of_each(t: Topics) -> list[tuple[str, bytes]]:
    return [
        (t.camera_stage("north"), _image_message("north-r-000001", "north", 1.7e9, 3)),
        (t.stage(1), _tensor_message("north-r-000001")),  # not a camera's: never recorded
        (t.results, good_json("result", request_id="north-r-000001", label_index=3)),
        (t.exits, good_json("exit", request_id="north-r-000001", latency_s=0.2)),
        (
            t.control_stage(1),
            good_json("level", stage=1, level=2, ratio=0.2, seq=1),
        ),
        (t.decisions, good_json("decision", action="prune", levels=[0, 2])),
        (t.status("n1"), good_json("status", node="n1", state="online")),
        (t.metrics("n1"), good_json("metrics", node="n1", queue_depth=4)),
        (t.node_errors("n1"), good_json("error", node="n1", reason="bad")),
        (t.results, b"{not json"),  # counted as bad, not recorded
        (t.plan, good_json("plan")),  # not a recorded kind
        (Topics(f"{t.pipe}-other").results, codec.encode_json("result", {"request_id": "x"})),
    ]


async def _publish(mqtt: MqttSettings, messages: list[tuple[str, bytes]]) -> None:
    async with Session(mqtt, name="test-publisher") as session:
        for topic, payload in messages:
            await session.publish(topic, payload, qos=1)


async def test_the_recorder_keeps_each_kind_with_its_receipt_time_in_memory_and_on_file(
    mqtt: MqttSettings, topic_prefix: str, tmp_path: Path
) -> None:
    t = Topics(topic_prefix)
    path = tmp_path / "run" / "events.jsonl"
    async with Recorder(mqtt, topic_prefix, path).running() as recorder:
        before = time.time()
        await _publish(mqtt, _one_of_each(t))
        await wait_until(
            lambda: all(recorder.events[k] for k in KINDS) and recorder.bad == 1, 10, "each kind"
        )
        after = time.time()
        recorder.reset()
        await _publish(mqtt, [(t.exits, good_json("exit", request_id="late"))])
        await wait_until(lambda: bool(recorder.events["exit"]), 10, "the exit after the reset")
        after_reset = recorder.events.counts()

    # after the reset: the state kinds and what came since, each with when it arrived
    assert after_reset == {
        k: 1 if k in ("status", "level", "decision", "exit") else 0 for k in KINDS
    }
    on_file = load_events(path)
    nonzero = {k: n for k, n in after_reset.items() if n}
    assert {k: n for k, n in on_file.counts().items() if n} == nonzero  # file replays memory
    assert on_file["exit"][0]["request_id"] == "late"
    assert on_file["status"] == recorder.events["status"]
    [level] = recorder.events["level"]
    assert level["topic"] == t.control_stage(1) and level["level"] == 2
    assert before <= level["rx"] <= after
    [status] = recorder.events["status"]
    assert (status["kind"], status["node"], status["state"]) == ("status", "n1", "online")

    # before the reset the file had every kind once: the camera's message as a send record
    lines = path.read_text().splitlines()
    kinds = [line.split('"event": "', 1)[1].split('"', 1)[0] for line in lines]
    assert sorted(kinds[: len(KINDS)]) == sorted(KINDS) and kinds[len(KINDS) :] == ["reset", "exit"]
    send = load_events_before_reset(path)["send"][0]
    assert {k: send[k] for k in ("request_id", "camera", "entry_ts", "attempt", "label")} == {
        "request_id": "north-r-000001",
        "camera": "north",
        "entry_ts": 1.7e9,
        "attempt": 0,
        "label": 3,
    }
    assert recorder.sent_ids() == set() and recorder.completed() == 0  # reset forgot them


def load_events_before_reset(path: Path) -> dict[str, list[dict[str, object]]]:
    """The records of ``path`` up to its reset marker, by kind."""
    import json

    out: dict[str, list[dict[str, object]]] = {}
    for line in path.read_text().splitlines():
        item = json.loads(line)
        if item["event"] == "reset":
            break
        out.setdefault(item.pop("event"), []).append(item)
    return out


async def test_a_recorder_of_some_kinds_subscribes_to_nothing_else(
    mqtt: MqttSettings, topic_prefix: str
) -> None:
    t = Topics(topic_prefix)
    async with Recorder(mqtt, topic_prefix, kinds=("result",)).running() as recorder:
        # published before the result, on the same connection: would have arrived first
        others = [m for m in _one_of_each(t) if m[0] != t.results]
        await _publish(mqtt, [*others, (t.exits, b"{not json"), (t.status("n1"), b"\xff")])
        await _publish(mqtt, [(t.results, good_json("result", request_id="r1"))])
        await wait_until(lambda: bool(recorder.events["result"]), 10, "the result")
    assert {k: n for k, n in recorder.events.counts().items() if n} == {"result": 1}
    assert recorder.bad == 0  # the garbage went to topics it does not read
    assert recorder.observer.subscriptions == ((t.results, 1),)


async def test_an_observer_stops_after_count_messages_or_at_its_timeout(
    mqtt: MqttSettings, topic_prefix: str
) -> None:
    t = Topics(topic_prefix)
    seen: list[Observed] = []
    observer = Observer(mqtt, [(t.everything, 1)], seen.append)
    payloads = [codec.encode_json("metrics", {"i": i}) for i in range(3)]

    async def publish_when_ready() -> None:
        await observer.ready.wait()
        await _publish(mqtt, [(t.metrics("n0"), p) for p in payloads])

    announced: list[bool] = []
    publisher = asyncio.create_task(publish_when_ready())
    n = await observer.watch(count=2, timeout=20, on_ready=lambda: announced.append(True))
    await publisher
    assert n == 2 and announced == [True]
    assert [(m.topic, bytes(m.payload), m.retained) for m in seen] == [
        (t.metrics("n0"), payloads[0], False),
        (t.metrics("n0"), payloads[1], False),
    ]

    quiet = Observer(mqtt, [(Topics(f"{topic_prefix}-quiet").everything, 1)], seen.append)
    started = time.monotonic()
    assert await quiet.watch(count=1, timeout=0.5) == 0
    assert time.monotonic() - started < 10

    stop = asyncio.Event()
    stop.set()
    assert await Observer(mqtt, [(t.everything, 1)], seen.append).watch(stop) == 0


async def test_an_observer_without_a_broker_raises_broker_error() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nowhere = MqttSettings(host="127.0.0.1", port=port)
    observer = Observer(nowhere, [(Topics("x").everything, 1)], lambda m: None)
    with pytest.raises(BrokerError, match="observer at"):
        await observer.watch(timeout=10)
    with pytest.raises(BrokerError):
        async with Recorder(nowhere, "x").running(timeout=10):
            pass


def _cli(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "edgeprune", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )


async def test_tap_prints_a_line_per_message_and_exits_at_its_count(
    mosquitto: MosquittoBroker, mqtt: MqttSettings, topic_prefix: str
) -> None:
    t = Topics(topic_prefix)
    broker = ("--host", mosquitto.host, "--port", str(mosquitto.port), "--pipe", topic_prefix)
    proc = _cli("tap", *broker, "--topic", "nodes/#", "--count", "2", "--timeout", "60")
    out = LineReader(proc.stdout)
    try:
        await asyncio.to_thread(LineReader(proc.stderr).until, lambda x: "tap:" in x, 30.0)
        await _publish(
            mqtt,
            [
                (t.results, codec.encode_json("result", {"request_id": "r"})),  # not subscribed
                (t.status("n0"), codec.encode_json("status", {"node": "n0", "state": "online"})),
                (t.metrics("n0"), b"\xff"),
            ],
        )
        lines = await asyncio.to_thread(out.until, lambda x: "metrics" in x, 30.0)
        code = await asyncio.to_thread(proc.wait, 30)
    finally:
        stop_process(proc)
    assert code == 0
    assert len(lines) == 2
    assert "nodes/n0/status" in lines[0] and "state=online" in lines[0]
    assert "nodes/n0/metrics" in lines[1] and "undecodable" in lines[1]


async def test_top_once_shows_the_retained_node_status(
    mosquitto: MosquittoBroker, mqtt: MqttSettings, topic_prefix: str
) -> None:
    t = Topics(topic_prefix)
    status = good_json("status", node="n0", state="online", stage=0)
    async with Session(mqtt, name="test-publisher") as session:
        await session.publish(t.status("n0"), status, qos=1, retain=True)
    broker = ("--host", mosquitto.host, "--port", str(mosquitto.port), "--pipe", topic_prefix)
    proc = _cli("top", *broker, "--once", "1")
    try:
        out, err = await asyncio.to_thread(proc.communicate, timeout=60)
    finally:
        stop_process(proc)
        await clear_retained(mqtt, topic_prefix, [t.status("n0")])
    assert proc.returncode == 0, err
    rows = [line.split() for line in out.splitlines() if line.startswith("n0")]
    assert rows and rows[0][:3] == ["n0", "online", "0"], out


async def test_the_hop_bench_times_real_hops_through_the_broker(mqtt: MqttSettings) -> None:
    rows = await measure_hops(mqtt, [4096, 65536], 20)
    assert [r["bytes"] for r in rows] == [4096, 65536]
    for r in rows:
        assert r["wire_bytes"] > r["bytes"]  # the tensor plus the message's fields
        assert 0 < r["decode_ms"] < r["hop_p50_ms"] <= r["hop_p95_ms"]
        assert 0 < r["encode_ms"] < r["hop_p50_ms"]
