"""Bad input to a live 2-node pipeline on the real broker, one test per kind of bad message.

Each bad message must come back on ``errors`` with a reason (and the request id when it was
readable), be counted in the node's ``errors`` counter (in-process and in the published
metrics), and leave the node serving: a good image sent afterwards still gets its result.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiomqtt
import msgpack
import numpy as np
import pytest

from nodes.camera import encode_image
from nodes.node import SliceNode
from pipeline import codec
from pipeline.slicing import parse_cuts
from pipeline.topics import Topics
from tests.helpers import running_nodes, wait_until

BOUNDS = parse_cuts("3", 5)  # stage 0 runs blocks [0, 3), stage 1 runs [3, 5)
MAX_PAYLOAD = 64 * 1024  # the nodes' max_payload_bytes; far below the broker's packet limit
NODE_CONFIG: dict[str, Any] = {
    "ratios": (0.0, 0.5),
    "recalibrate_bn": False,
    "metrics_interval_s": 0.1,
    "max_payload_bytes": MAX_PAYLOAD,
}
_ids = itertools.count()


@dataclass
class Watch:
    """The JSON traffic a test asserts on: errors, results and node metrics, in order."""

    errors: list[dict[str, Any]] = field(default_factory=list)
    results: list[dict[str, Any]] = field(default_factory=list)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    error_topics: list[str] = field(default_factory=list)  # where each error came

    def errors_of(self, node: str) -> list[dict[str, Any]]:
        return [e for e in self.errors if e["node"] == node]


@dataclass
class Rig:
    """A running pipeline, a client to publish with, and what came back."""

    pipe: Topics
    nodes: list[SliceNode]
    client: aiomqtt.Client
    watch: Watch
    image: bytes  # a real PNG from the test split


@contextlib.asynccontextmanager
async def rig(checkpoint: Any, test_images: Any, mqtt: Any, pipe: str) -> AsyncIterator[Rig]:
    topics = Topics(pipe)
    watch = Watch()
    async with (
        running_nodes(checkpoint, mqtt, pipe, BOUNDS, **NODE_CONFIG) as nodes,
        aiomqtt.Client(**mqtt.aiomqtt_kwargs()) as client,
    ):
        for t in (topics.errors_all, topics.results, topics.metrics_all):
            await client.subscribe(t, qos=1)

        async def listen() -> None:
            async for message in client.messages:
                body = codec.decode_json(bytes(message.payload))  # type: ignore[arg-type]
                {"error": watch.errors, "result": watch.results, "metrics": watch.metrics}[
                    body["kind"]
                ].append(body)
                if body["kind"] == "error":
                    watch.error_topics.append(str(message.topic))

        task = asyncio.create_task(listen())
        try:
            yield Rig(topics, nodes, client, watch, encode_image(test_images.images[0], "png")[0])
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


CAMERA = "cam-test"


def _stage0(rid: str, image: bytes, fmt: str = "png") -> bytes:
    return codec.encode_stage(
        codec.StageMessage(
            request_id=rid,
            camera=CAMERA,
            stage=0,
            entry_ts=1.7e9,
            capture_ts=1.7e9,
            image=image,
            image_format=fmt,
        )
    )


def _stage1(rid: str, tensor: np.ndarray) -> bytes:
    return codec.encode_stage(
        codec.StageMessage(
            request_id=rid,
            camera=CAMERA,
            stage=1,
            entry_ts=1.7e9,
            capture_ts=1.7e9,
            hops=(codec.Hop(0, "n0", 0.001, 0.002, 0),),
            tensor=tensor,
        )
    )


def _stage1_input(r: Rig, batch: int = 1, dtype: Any = np.float32) -> np.ndarray:
    shape = r.nodes[1].slice.model_slice.in_shape  # type: ignore[union-attr]
    return np.random.default_rng(0).standard_normal((batch, *shape)).astype(dtype)


def _rid(case: str) -> str:
    return f"bad-{case}-{next(_ids)}"


async def rejected_then_served(
    r: Rig, topic: str, payload: bytes, *, node: int, reason: str, request_id: str | None
) -> dict[str, Any]:
    """Publish ``payload``; assert node ``node`` reports it on errors and counts it, and that
    a good image sent afterwards still gets a result. Returns the error message."""
    name = f"n{node}"
    await r.client.publish(topic, payload, qos=1)
    await wait_until(lambda: bool(r.watch.errors_of(name)), what=f"an error from {name}")
    [error] = r.watch.errors  # exactly one error, from the node that got the message
    assert error["node"] == name and error["stage"] == node
    assert r.watch.error_topics == [r.pipe.node_errors(name)]  # the ACL ties it to the node
    assert reason in error["reason"], error["reason"]
    assert error["request_id"] == request_id
    assert error["shed"] is False and error["ts"] > 0

    good = _rid("good")
    await r.client.publish(r.pipe.camera_stage(CAMERA), _stage0(good, r.image), qos=1)
    await wait_until(
        lambda: any(x["request_id"] == good for x in r.watch.results),
        what="a result for the good request after the bad one",
    )
    [result] = [x for x in r.watch.results if x["request_id"] == good]
    assert result["levels"] == [0, 0]
    # the counters: in the node, and in a metrics message it published after the error
    assert [n.metrics()["errors"] for n in r.nodes] == [int(i == node) for i in range(2)]
    assert r.nodes[node].metrics()["processed"] >= 1
    await wait_until(
        lambda: any(m["node"] == name and m["errors"] == 1 for m in r.watch.metrics),
        what=f"{name} metrics errors=1",
    )
    assert all(m["errors"] == 0 for m in r.watch.metrics if m["node"] != name)
    return error


@pytest.mark.parametrize("variant", ["garbage", "truncated"])
async def test_malformed_msgpack(checkpoint, test_images, mqtt, topic_prefix, variant):
    async with rig(checkpoint, test_images, mqtt, topic_prefix) as r:
        rid = _rid("truncated")
        if variant == "garbage":  # 0xc1 is never used by msgpack: no id can be read
            payload, expected_id = b"\xc1\x00not msgpack at all", None
        else:  # cut inside the tensor bytes: the id in the header is still readable
            full = _stage1(rid, _stage1_input(r))
            payload, expected_id = full[: len(full) // 2], rid
        error = await rejected_then_served(
            r, r.pipe.stage(1), payload, node=1, reason="malformed msgpack", request_id=expected_id
        )
        assert error["topic"] == r.pipe.stage(1) and error["bytes"] == len(payload)


async def test_wrong_shape(checkpoint, test_images, mqtt, topic_prefix):
    async with rig(checkpoint, test_images, mqtt, topic_prefix) as r:
        rid = _rid("shape")
        c, h, w = r.nodes[1].slice.model_slice.in_shape  # type: ignore[union-attr]
        x = np.zeros((1, c, h + 1, w + 1), dtype=np.float32)
        await rejected_then_served(
            r,
            r.pipe.stage(1),
            _stage1(rid, x),
            node=1,
            reason="does not fit this slice's input",
            request_id=rid,
        )


async def test_wrong_dtype(checkpoint, test_images, mqtt, topic_prefix):
    async with rig(checkpoint, test_images, mqtt, topic_prefix) as r:
        rid = _rid("dtype")
        x = _stage1_input(r, dtype=np.int32)
        error = await rejected_then_served(
            r, r.pipe.stage(1), _stage1(rid, x), node=1, reason="float32", request_id=rid
        )
        assert "int32" in error["reason"]


async def test_unknown_schema_version(checkpoint, test_images, mqtt, topic_prefix):
    async with rig(checkpoint, test_images, mqtt, topic_prefix) as r:
        rid = _rid("version")
        wire = msgpack.unpackb(_stage1(rid, _stage1_input(r)))
        wire["v"] = codec.SCHEMA_VERSION + 1
        await rejected_then_served(
            r,
            r.pipe.stage(1),
            msgpack.packb(wire),
            node=1,
            reason=f"unsupported schema version {wire['v']}",
            request_id=rid,
        )


async def test_oversized_payload(checkpoint, test_images, mqtt, topic_prefix, mosquitto):
    async with rig(checkpoint, test_images, mqtt, topic_prefix) as r:
        rid = _rid("big")
        payload = _stage1(rid, _stage1_input(r, batch=8))
        assert MAX_PAYLOAD < len(payload) < mosquitto.max_packet_size  # the broker passes it
        error = await rejected_then_served(
            r,
            r.pipe.stage(1),
            payload,
            node=1,
            reason=f"exceeds the limit of {MAX_PAYLOAD}",
            request_id=rid,
        )
        assert error["bytes"] == len(payload)


async def test_image_that_does_not_decode(checkpoint, test_images, mqtt, topic_prefix):
    async with rig(checkpoint, test_images, mqtt, topic_prefix) as r:
        rid = _rid("image")
        payload = _stage0(rid, b"these bytes are not a PNG file")
        await rejected_then_served(
            r,
            r.pipe.camera_stage(CAMERA),
            payload,
            node=0,
            reason="image does not decode",
            request_id=rid,
        )


async def test_image_on_another_cameras_topic(checkpoint, test_images, mqtt, topic_prefix):
    """Camera ``<id>`` may write only ``stage/0/<id>`` on the secure broker; the node checks
    that the message's camera is the topic's, so no camera can speak for another."""
    async with rig(checkpoint, test_images, mqtt, topic_prefix) as r:
        rid = _rid("forged")
        error = await rejected_then_served(
            r,
            r.pipe.camera_stage("cam-other"),
            _stage0(rid, r.image),
            node=0,
            reason="camera 'cam-test' in a message on camera 'cam-other''s topic",
            request_id=rid,
        )
        assert error["topic"] == r.pipe.camera_stage("cam-other")


@pytest.mark.parametrize("variant", ["level out of range", "not JSON"])
async def test_bad_control_message(checkpoint, test_images, mqtt, topic_prefix, variant):
    async with rig(checkpoint, test_images, mqtt, topic_prefix) as r:
        levels = len(NODE_CONFIG["ratios"])
        if variant == "not JSON":
            payload, reason = b"\xfflevel=3", "malformed JSON"
        else:
            payload = codec.encode_json(
                "level", {"stage": 1, "level": levels, "ratio": 0.9, "seq": 1, "reason": "test"}
            )
            reason = f"level {levels} out of range"
        # not retained: nothing to clean up, and the node is subscribed already
        error = await rejected_then_served(
            r, r.pipe.control_stage(1), payload, node=1, reason=reason, request_id=None
        )
        assert error["reason"].startswith("bad control message")
        assert error["topic"] == r.pipe.control_stage(1)
        assert r.nodes[1].metrics()["level"] == 0 and r.nodes[1].metrics()["level_changes"] == 0
