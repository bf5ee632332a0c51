"""`edgeprune tap` formatting, on messages built with the codec (no broker)."""

from __future__ import annotations

import json
from typing import Any

import msgpack
import numpy as np
import pytest

from bus.topics import Topics
from edgeprune.commands.tap import topic_filters
from nodes.tap import describe, format_line, is_stage_topic, json_line, short_topic
from pipeline import codec

T = Topics("farm")
HOPS = (codec.Hop(0, "pi-a", 0.0012, 0.0305, 0), codec.Hop(1, "pi-b", 0.0004, 0.021, 3))
TS = 1_700_000_000.5


def _tensor_msg(**kw) -> codec.StageMessage:
    kept = np.array([0, 2, 5, 7], dtype=np.int32)
    x = np.ones((1, 4, 7, 7), dtype=np.float32)
    fields: dict[str, Any] = dict(
        request_id="cam3-r-000042",
        camera="cam3",
        stage=2,
        entry_ts=TS - 0.25,
        capture_ts=TS - 0.3,
        label=4,
        hops=HOPS,
        tensor=x,
        channels=kept,
        full_channels=16,
    )
    fields.update(kw)
    return codec.StageMessage(**fields)


def test_a_pruned_tensor_message_shows_ids_hops_and_kept_channels():
    payload = codec.encode_stage(_tensor_msg())
    rec = describe(T.stage(2), payload, ts=TS)
    assert rec.kind == "stage" and rec.size == len(payload) and rec.version == 1
    b = rec.body
    assert (b["request_id"], b["camera"], b["stage"], b["label"]) == ("cam3-r-000042", "cam3", 2, 4)
    assert [h["node"] for h in b["hops"]] == ["pi-a", "pi-b"] and b["hops"][1]["level"] == 3
    assert b["tensor"] == {
        "dtype": "float32",
        "wire_dtype": "float32",
        "shape": [1, 4, 7, 7],
        "channels": 4,
        "full_channels": 16,
        "bytes": 4 * 49 * 4,
    }
    assert b["age_s"] == pytest.approx(0.25)
    line = format_line(rec)
    assert "stage/2" in line and "farm" not in line  # the pipe prefix is dropped
    for part in (
        "id=cam3-r-000042",
        "cam=cam3",
        "st=2",
        "y=4",
        "ch=4/16",
        "x=float32[1,4,7,7]",
        "784B",
        "0:pi-a@L0(1.2ms+30.5ms)",
        "1:pi-b@L3(0.4ms+21.0ms)",
        "age=250.0ms",
    ):
        assert part in line, (part, line)
    assert "\n" not in line


def test_float16_transport_and_unpruned_tensor():
    msg = _tensor_msg(channels=None, full_channels=None, tensor=np.zeros((1, 8, 2, 2), np.float32))
    rec = describe(T.stage(2), codec.encode_stage(msg, float16=True), ts=TS)
    t = rec.body["tensor"]
    assert (t["dtype"], t["wire_dtype"], t["channels"], t["full_channels"], t["bytes"]) == (
        "float32",
        "float16",
        8,
        8,
        8 * 4 * 2,
    )
    assert "x=float32<-float16[1,8,2,2] ch=8/8 64B" in format_line(rec)


@pytest.mark.parametrize(
    ("fmt", "shape", "expect"),
    [("png", None, "image=png 2.0KB"), ("raw", (32, 64), "image=raw 32x64 2.0KB")],
)
def test_an_image_message_shows_format_and_bytes(fmt, shape, expect):
    msg = codec.StageMessage(
        request_id="r1",
        camera="trap-7",
        stage=0,
        entry_ts=TS,
        capture_ts=TS - 1,
        image=b"\x89" * 2048,
        image_format=fmt,
        image_shape=shape,
    )
    rec = describe(T.stage(0), codec.encode_stage(msg), ts=TS)
    assert rec.body["image"] == {
        "format": fmt,
        "bytes": 2048,
        "shape": list(shape) if shape else None,
    }
    assert rec.body["hops"] == [] and "tensor" not in rec.body
    line = format_line(rec)
    assert expect in line and "hops=[]" in line and "cam=trap-7" in line and "y=" not in line


def test_json_topics_are_printed_compactly_without_v_and_kind():
    payload = codec.encode_json(
        "result",
        {
            "request_id": "r9",
            "camera": "cam0",
            "label": "zebra",
            "score": 0.912345678,
            "levels": [0, 2],
            "correct": True,
            "entry_ts": TS,
        },
    )
    rec = describe(T.results, payload, ts=TS)
    assert rec.kind == "result" and rec.version == 1 and "v" not in rec.body
    line = format_line(rec)
    assert line.split()[1:3] == ["results", "result"]
    assert (
        "request_id=r9 camera=cam0 label=zebra score=0.912346 levels=[0,2] correct=true "
        f"entry_ts={TS:.3f}" in line
    )


def test_retained_and_nested_json():
    payload = codec.encode_json(
        "level", {"stage": 1, "level": 3, "ratio": 0.3, "seq": 7, "reason": "stage 1 slow"}
    )
    line = format_line(describe(T.control_stage(1), payload, retained=True, ts=TS))
    assert "control/stage/1" in line and "(retained)" in line
    assert 'reason="stage 1 slow"' in line
    exit_ = codec.encode_json("exit", {"stages": [{"stage": 0, "node": "n0", "level": 1}]})
    assert "stages=[{stage:0,node:n0,level:1}]" in format_line(describe(T.exits, exit_))


@pytest.mark.parametrize(
    ("topic", "payload", "reason", "rid"),
    [
        (T.stage(1), b"\xc1garbage", "malformed msgpack", None),
        (T.stage(1), "truncated", "malformed msgpack", "cam3-r-000042"),
        (T.stage(1), "version", "unsupported schema version 9", "cam3-r-000042"),
        (T.errors, b"{not json", "malformed JSON", None),
        (T.metrics("n0"), b'{"v":1}', "kind", None),
    ],
)
def test_undecodable_payloads_become_invalid_records(topic, payload, reason, rid):
    good = codec.encode_stage(_tensor_msg())
    if payload == "truncated":
        payload = good[: len(good) - 100]
    elif payload == "version":
        wire = msgpack.unpackb(good)
        wire["v"] = 9
        payload = msgpack.packb(wire)
    rec = describe(topic, payload, ts=TS)
    assert rec.kind == "invalid" and reason in rec.body["reason"]
    assert rec.body.get("request_id") == rid
    line = format_line(rec)
    assert "undecodable:" in line and (rid is None or f"id={rid}" in line)


def test_empty_payload_is_a_cleared_retained_message():
    rec = describe(T.control_stage(0), b"", retained=True, ts=TS)
    assert rec.kind == "empty" and rec.size == 0
    assert "retained message cleared" in format_line(rec)


def test_json_lines_are_one_object_each():
    recs = [
        describe(T.stage(2), codec.encode_stage(_tensor_msg()), ts=TS),
        describe(
            T.status("n1"), codec.encode_json("status", {"node": "n1", "state": "online"}), ts=TS
        ),
        describe(T.stage(1), b"\xc1", ts=TS),
    ]
    for rec in recs:
        line = json_line(rec)
        assert "\n" not in line
        obj = json.loads(line)
        assert obj["topic"] == rec.topic and obj["kind"] == rec.kind and obj["ts"] == TS
        assert obj["bytes"] == rec.size and obj["body"] == json.loads(json.dumps(rec.body))
    assert json.loads(json_line(recs[0]))["body"]["tensor"]["shape"] == [1, 4, 7, 7]
    assert json.loads(json_line(recs[1]))["body"] == {"node": "n1", "state": "online"}


def test_topic_helpers():
    assert is_stage_topic(T.stage(0)) and not is_stage_topic(T.control_stage(0))
    assert not is_stage_topic(T.results)
    assert short_topic(T.metrics("n0")) == "nodes/n0/metrics"
    assert short_topic("other/topic") == "other/topic"
    assert topic_filters(T, None) == [T.everything]
    assert topic_filters(T, ["stage/+", Topics("other").errors]) == [
        T.stage_all,
        Topics("other").errors,
    ]
