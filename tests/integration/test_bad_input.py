"""Bad input to a live 2-node pipeline on the real broker, one test per kind of bad message.

Each bad message must come back on ``errors`` with a reason (and the request id when it was
readable), be counted in the node's ``errors`` counter (in-process and in the published
metrics), and leave the node serving: a good image sent afterwards still gets its result.
Further down: plans that do not fit or fail to build, retained levels (garbage, cleared, across
a broker restart), both payload limits, the controller's rejections, and a node that stops on
an error (its retained status must say so).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiomqtt
import msgpack
import numpy as np
import pytest

from bus.connection import MqttSettings
from bus.messages import CATALOGUE
from bus.plan_message import PlanMessage
from bus.topics import Topics
from controller.service import Controller
from nodes import node as node_module
from nodes.camera import encode_image
from nodes.config import NodeConfig
from nodes.node import SliceNode
from pipeline import codec
from pipeline.errors import CodecError
from pipeline.placement import Placement, SliceBounds
from pipeline.slicing import parse_cuts
from tests.helpers import clear_retained, collecting, publish_level, running_nodes, wait_until
from tests.unit.test_controller_service import calibration as synthetic_calibration
from tests.unit.test_controller_service import config as controller_config

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
async def rig(
    checkpoint: Any, test_images: Any, mqtt: Any, pipe: str, **node_config: Any
) -> AsyncIterator[Rig]:
    topics = Topics(pipe)
    watch = Watch()
    async with (
        running_nodes(checkpoint, mqtt, pipe, BOUNDS, **{**NODE_CONFIG, **node_config}) as nodes,
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
    assert [n.metrics().errors for n in r.nodes] == [int(i == node) for i in range(2)]
    assert r.nodes[node].metrics().processed >= 1
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
        assert r.nodes[1].metrics().level == 0 and r.nodes[1].metrics().level_changes == 0


# ---- values, failures while serving ----------------------------------------------------


def _with_values(payload: bytes, values: dict[int, float]) -> bytes:
    """``payload`` with tensor elements (flat index -> value) overwritten on the wire: a sender
    that does not validate, since a StageMessage refuses non-finite values."""
    wire = msgpack.unpackb(payload)
    x = np.frombuffer(wire["x"]["data"], dtype=wire["x"]["dtype"]).copy()
    for index, value in values.items():
        x[index] = value
    wire["x"]["data"] = x.tobytes()
    return bytes(msgpack.packb(wire))


async def _good_result(r: Rig) -> dict[str, Any]:
    """Send a good image; return its result once it comes."""
    rid = _rid("good")
    await r.client.publish(r.pipe.camera_stage(CAMERA), _stage0(rid, r.image), qos=1)
    await wait_until(
        lambda: any(x["request_id"] == rid for x in r.watch.results),
        what=f"a result for the good request {rid}",
    )
    [result] = [x for x in r.watch.results if x["request_id"] == rid]
    return result


async def test_nan_and_infinite_activations_are_rejected_and_the_node_serves_on(
    checkpoint, test_images, mqtt, topic_prefix
):
    async with rig(checkpoint, test_images, mqtt, topic_prefix) as r:
        sent = {}
        for case, value in (("nan", np.nan), ("inf", np.inf), ("-inf", -np.inf)):
            rid = _rid(case)
            sent[rid] = _with_values(_stage1(rid, _stage1_input(r)), {0: 1.0, 7: value})
            await r.client.publish(r.pipe.stage(1), sent[rid], qos=1)
        await wait_until(lambda: len(r.watch.errors) == 3, what="three errors")
        assert [e["request_id"] for e in r.watch.errors] == list(sent)
        for error in r.watch.errors:
            assert error["node"] == "n1" and error["topic"] == r.pipe.stage(1)
            assert "non-finite values" in error["reason"], error["reason"]
            assert error["bytes"] == len(sent[error["request_id"]])
        assert (await _good_result(r))["levels"] == [0, 0]
        assert r.nodes[1].metrics().errors == 3


async def test_huge_finite_activations_whose_output_overflows_are_rejected(
    checkpoint, test_images, mqtt, topic_prefix
):
    async with rig(checkpoint, test_images, mqtt, topic_prefix) as r:
        rid = _rid("huge")
        x = np.full((1, *r.nodes[1].slice.model_slice.in_shape), 3e38, dtype=np.float32)  # type: ignore[union-attr]
        await rejected_then_served(
            r, r.pipe.stage(1), _stage1(rid, x), node=1, reason="not finite", request_id=rid
        )


async def test_an_unexpected_failure_while_serving_is_reported_and_the_worker_serves_on(
    checkpoint, test_images, mqtt, topic_prefix, monkeypatch
):
    async with rig(checkpoint, test_images, mqtt, topic_prefix) as r:
        node = r.nodes[1]
        real_emit = node._emit
        failures = []

        def emit_failing_once(*args: Any) -> None:
            if not failures:
                failures.append(args)
                raise RuntimeError("injected: the outbox is broken")
            real_emit(*args)

        monkeypatch.setattr(node, "_emit", emit_failing_once)
        rid = _rid("internal")
        await rejected_then_served(
            r,
            r.pipe.stage(1),
            _stage1(rid, _stage1_input(r)),
            node=1,
            reason="internal error: RuntimeError: injected: the outbox is broken",
            request_id=rid,
        )


# ---- plans ----------------------------------------------------------------------------------

MOVED = [SliceBounds(0, 2), SliceBounds(2, 5)]  # the cut moved from 3 to 2


def _plan_version(r: Rig) -> list[int]:
    return [n.metrics().plan_version for n in r.nodes]


async def test_a_plan_for_a_model_of_other_blocks_is_rejected(
    checkpoint, test_images, mqtt, topic_prefix
):
    async with rig(checkpoint, test_images, mqtt, topic_prefix) as r:
        # before: n1 took [3, 4), was no longer last, and sent every request to a stage/2
        # that nobody serves
        plan = PlanMessage(1, Placement.build([SliceBounds(0, 3), SliceBounds(3, 4)], ["n0", "n1"]))
        await r.client.publish(r.pipe.plan, plan.to_json(), qos=1, retain=True)
        try:
            await wait_until(
                lambda: {e["node"] for e in r.watch.errors} == {"n0", "n1"},
                what="both nodes rejecting the plan",
            )
            for e in r.watch.errors:
                assert e["topic"] == r.pipe.plan
                assert "model of 4 blocks; this node's model has 5" in e["reason"], e["reason"]
                assert f"still serving blocks [{BOUNDS[e['stage']].start}," in e["reason"]
            assert (await _good_result(r))["levels"] == [0, 0]
            assert [n.slice.model_slice.bounds for n in r.nodes] == BOUNDS  # type: ignore[union-attr]
            assert _plan_version(r) == [-1, -1] and len(r.watch.errors) == 2
        finally:
            await clear_retained(mqtt, topic_prefix, [r.pipe.plan])


async def test_the_plan_version_advances_only_once_the_new_slice_is_built(
    checkpoint, test_images, mqtt, topic_prefix, monkeypatch
):
    async with rig(checkpoint, test_images, mqtt, topic_prefix) as r:
        building, release = threading.Event(), threading.Event()
        real_build = node_module.build_prunable

        def held_build(*args: Any, **kwargs: Any) -> Any:
            building.set()
            if not release.wait(60):
                raise TimeoutError("the test never released the build")
            return real_build(*args, **kwargs)

        monkeypatch.setattr(node_module, "build_prunable", held_build)
        plan = PlanMessage(1, Placement.build(MOVED, ["n0", "n1"]), "move the cut")
        await r.client.publish(r.pipe.plan, plan.to_json(), qos=1, retain=True)
        try:
            await wait_until(building.is_set, what="a node building its new slice")
            assert _plan_version(r) == [-1, -1]  # not before its slice exists
            release.set()
            await wait_until(lambda: _plan_version(r) == [1, 1], what="plan v1 applied")
            assert [n.slice.model_slice.bounds for n in r.nodes] == MOVED  # type: ignore[union-attr]
            assert (await _good_result(r))["levels"] == [0, 0]
            assert r.watch.errors == []
        finally:
            release.set()
            await clear_retained(mqtt, topic_prefix, [r.pipe.plan])


async def test_a_plan_that_fails_to_build_is_reported_and_the_old_slice_serves_on(
    checkpoint, test_images, mqtt, topic_prefix, monkeypatch
):
    async with rig(checkpoint, test_images, mqtt, topic_prefix) as r:

        def out_of_memory(*args: Any, **kwargs: Any) -> Any:
            raise MemoryError("injected: no room for another slice")

        monkeypatch.setattr(node_module, "build_prunable", out_of_memory)
        plan = PlanMessage(1, Placement.build(MOVED, ["n0", "n1"]), "move the cut")
        await r.client.publish(r.pipe.plan, plan.to_json(), qos=1, retain=True)
        try:
            await wait_until(
                lambda: {e["node"] for e in r.watch.errors} == {"n0", "n1"},
                what="both nodes reporting the failed build",
            )
            for e in r.watch.errors:
                assert e["topic"] == r.pipe.plan
                assert e["reason"].startswith("cannot apply plan v1: MemoryError: injected")
                assert "still serving blocks" in e["reason"]
            assert _plan_version(r) == [-1, -1]
            assert [n.slice.model_slice.bounds for n in r.nodes] == BOUNDS  # type: ignore[union-attr]
            assert (await _good_result(r))["levels"] == [0, 0]
            assert len(r.watch.errors) == 2
        finally:
            await clear_retained(mqtt, topic_prefix, [r.pipe.plan])


# ---- retained levels ----------------------------------------------------------------------


async def test_clearing_the_retained_level_is_no_error_and_returns_the_node_to_level_0(
    checkpoint, test_images, mqtt, topic_prefix
):
    async with rig(checkpoint, test_images, mqtt, topic_prefix) as r:
        await publish_level(mqtt, topic_prefix, stage=1, level=1, ratio=0.5)
        await wait_until(lambda: r.nodes[1].metrics().level == 1, what="n1 at level 1")
        await clear_retained(mqtt, topic_prefix, [r.pipe.control_stage(1)])
        await wait_until(lambda: r.nodes[1].metrics().level == 0, what="n1 back at level 0")
        assert (await _good_result(r))["levels"] == [0, 0]
        assert r.watch.errors == [] and r.nodes[1].metrics().errors == 0


async def test_a_retained_garbage_level_is_reported_once_and_the_last_good_level_stays(
    checkpoint, test_images, topic_prefix, broker_factory
):
    broker = broker_factory(persistence=True)  # the retained messages survive its restart
    mqtt = MqttSettings(host=broker.host, port=broker.port)
    topics = Topics(topic_prefix)
    image = encode_image(test_images.images[0], "png")[0]
    async with running_nodes(checkpoint, mqtt, topic_prefix, BOUNDS, **NODE_CONFIG) as nodes:
        n1 = nodes[1]
        await publish_level(mqtt, topic_prefix, stage=1, level=1, ratio=0.5)
        await wait_until(lambda: n1.metrics().level == 1, what="n1 at level 1")
        async with (
            collecting(mqtt, topic_prefix) as col,
            aiomqtt.Client(**mqtt.aiomqtt_kwargs()) as client,
        ):
            await client.publish(topics.control_stage(1), b"\xfflevel=3", qos=1, retain=True)
            await wait_until(lambda: len(col.errors) == 1, what="the garbage level reported")
        assert col.errors[0]["reason"].startswith("bad control message: malformed JSON")
        assert n1.metrics().level == 1

        restarted = time.time()
        broker.restart()  # every client reconnects; the node gets the retained garbage again
        async with (
            collecting(mqtt, topic_prefix) as col,
            aiomqtt.Client(**mqtt.aiomqtt_kwargs()) as client,
        ):
            await wait_until(
                lambda: any(
                    s["node"] == "n1" and s["state"] == "online" and s["ts"] > restarted
                    for s in col.statuses
                ),
                what="n1 online again after the restart",
            )
            # the retained level reached n1 before this request did (one connection, in order)
            rid = _rid("good")
            await client.publish(topics.camera_stage(CAMERA), _stage0(rid, image), qos=1)
            await wait_until(
                lambda: any(x["request_id"] == rid for x in col.results), what="a result"
            )
        assert col.errors == []  # not reported again
        assert [x["levels"] for x in col.results if x["request_id"] == rid] == [[0, 1]]
        assert n1.metrics().errors == 1 and n1.metrics().level == 1


# ---- payload limits: the node's, below the broker's ---------------------------------------


async def test_a_payload_over_the_node_limit_but_under_the_broker_limit_is_reported(
    checkpoint, test_images, mqtt, topic_prefix, mosquitto
):
    limit = NodeConfig(node_id="default").max_payload_bytes  # the nodes' default limit
    async with rig(checkpoint, test_images, mqtt, topic_prefix, max_payload_bytes=limit) as r:
        rid = _rid("limit")
        sample_bytes = 4 * int(np.prod(r.nodes[1].slice.model_slice.in_shape))  # type: ignore[union-attr]
        payload = _stage1(rid, _stage1_input(r, batch=limit // sample_bytes + 1))
        # the broker passes it (the topic and MQTT header fit in what is left)
        assert limit < len(payload) < mosquitto.max_packet_size - 1024
        error = await rejected_then_served(
            r,
            r.pipe.stage(1),
            payload,
            node=1,
            reason=f"exceeds the limit of {limit}",
            request_id=rid,
        )
        assert error["bytes"] == len(payload)


async def test_a_payload_over_the_broker_limit_is_refused_and_the_node_serves_on(
    checkpoint, test_images, mqtt, topic_prefix, mosquitto
):
    async with rig(checkpoint, test_images, mqtt, topic_prefix) as r:
        too_big = b"\x00" * (mosquitto.max_packet_size + 1)
        with contextlib.suppress(aiomqtt.MqttError):  # the broker disconnects the sender
            async with aiomqtt.Client(**mqtt.aiomqtt_kwargs()) as sender:
                await asyncio.wait_for(sender.publish(r.pipe.stage(1), too_big, qos=1), 20)
        assert "disconnected due to oversize packet" in mosquitto.log_path.read_text()
        assert (await _good_result(r))["levels"] == [0, 0]  # n1 stayed connected
        assert r.watch.errors == [] and r.nodes[1].metrics().received == 1


# ---- the controller's rejections ----------------------------------------------------------


async def test_the_controller_publishes_the_inputs_it_rejects_on_errors(mqtt, topic_prefix):
    topics = Topics(topic_prefix)
    controller = Controller(controller_config(), synthetic_calibration(), mqtt, pipe=topic_prefix)
    stop = asyncio.Event()
    bad_level = codec.encode_json(
        "level", {"stage": 1, "level": 99, "ratio": 0.5, "seq": 1, "reason": "test"}
    )
    async with collecting(mqtt, topic_prefix) as col:
        task = asyncio.create_task(controller.run(stop))
        try:
            await asyncio.wait_for(controller.ready.wait(), 20)
            async with aiomqtt.Client(**mqtt.aiomqtt_kwargs()) as client:
                await client.publish(topics.control_stage(0), b"", qos=1)  # a clearing
                await client.publish(topics.exits, b"{not json", qos=1)
                await client.publish(topics.control_stage(1), bad_level, qos=1)
            await wait_until(lambda: len(col.errors) == 2, what="the controller's two errors")
        finally:
            stop.set()
            await asyncio.wait_for(task, 20)
    exits_error, level_error = col.errors
    assert {exits_error["node"], level_error["node"]} == {"controller"}
    assert exits_error["topic"] == topics.exits and exits_error["stage"] is None
    assert "malformed JSON" in exits_error["reason"] and exits_error["bytes"] == 9
    assert level_error["topic"] == topics.control_stage(1) and level_error["stage"] == 1
    assert "level 99 out of range" in level_error["reason"]
    assert controller.state.counts["bad_messages"] == 2


# ---- a node that stops on an error -------------------------------------------------------


async def test_a_node_that_stops_on_an_error_leaves_its_status_offline_with_the_reason(
    checkpoint, mqtt, topic_prefix, monkeypatch
):
    config = NodeConfig(
        node_id="n1", pipe=topic_prefix, stage=1, bounds=BOUNDS[1], mqtt=mqtt, **NODE_CONFIG
    )
    node = SliceNode(config, checkpoint)
    task = asyncio.create_task(node.run())
    try:
        await asyncio.wait_for(node.ready.wait(), 60)

        def broken_metrics() -> dict[str, Any]:
            raise RuntimeError("injected: the metrics source failed")

        monkeypatch.setattr(node, "metrics", broken_metrics)  # its metrics loop fails next
        with pytest.raises(RuntimeError, match="injected"):
            await asyncio.wait_for(task, 20)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    async with collecting(mqtt, topic_prefix) as col:  # a new subscriber: the retained status
        await wait_until(lambda: bool(col.statuses), what="n1's retained status")
    [status] = col.statuses
    assert status["node"] == "n1" and status["state"] == "offline"
    assert status["reason"] == "stopped on error: RuntimeError: injected: the metrics source failed"
    await clear_retained(mqtt, topic_prefix, [Topics(topic_prefix).status("n1")])


# ---- a bad level, plan or status: the one error of a bad message --------------------------

GOOD_BODIES: dict[str, dict[str, Any]] = {
    "level": {"stage": 1, "level": 1, "ratio": 0.5, "seq": 1, "reason": "test"},
    "plan": {
        "version": 50,
        "num_blocks": 5,
        "reason": "test",
        "stages": [
            {"stage": 0, "start": 0, "end": 3, "node": "n0"},
            {"stage": 1, "start": 3, "end": 5, "node": "n1"},
        ],
    },
    "status": {"node": "n1", "state": "online", "reason": "", "ts": 1.7e9},
}
# per kind: a wrong type, a value out of range, a missing field, another schema version
BAD_CHANGES: dict[str, list[dict[str, Any]]] = {
    "level": [{"level": "1"}, {"level": -1}, {"level": None}, {"v": 2}],
    "plan": [{"stages": "n0"}, {"version": -1}, {"stages": None}, {"v": 2}],
    "status": [{"ts": "now"}, {"state": "sleepy"}, {"node": None}, {"v": 2}],
}


def _bad_payloads(kind: str) -> list[tuple[bytes, str]]:
    """Each bad ``kind`` message (a change of a good one; None drops the field), with the
    reason of the CodecError its class's ``from_json`` raises for it."""
    out = []
    for change in BAD_CHANGES[kind]:
        obj = {"v": codec.SCHEMA_VERSION, "kind": kind, **GOOD_BODIES[kind]}
        obj.update(change)
        payload = json.dumps({k: v for k, v in obj.items() if v is not None}).encode()
        with pytest.raises(CodecError) as info:
            CATALOGUE[kind].from_json(payload)
        out.append((payload, info.value.reason))
    return out


@pytest.mark.parametrize("kind", ["level", "plan"])
async def test_a_bad_level_or_plan_is_refused_by_the_node_with_its_codec_error(
    checkpoint, test_images, mqtt, topic_prefix, kind
):
    async with rig(checkpoint, test_images, mqtt, topic_prefix) as r:
        topic = r.pipe.control_stage(1) if kind == "level" else r.pipe.plan
        bad = _bad_payloads(kind)
        for payload, _ in bad:  # not retained: nothing to clean up
            await r.client.publish(topic, payload, qos=1)
        readers = ["n1"] if kind == "level" else ["n0", "n1"]  # every node reads the plan
        await wait_until(
            lambda: len(r.watch.errors) == len(bad) * len(readers), what=f"the bad {kind}s"
        )
        prefix = "bad control message: " if kind == "level" else "bad plan: "
        for name in readers:
            errors = r.watch.errors_of(name)
            assert [e["reason"] for e in errors] == [prefix + reason for _, reason in bad]
            assert all(e["topic"] == topic for e in errors)
        assert (await _good_result(r))["levels"] == [0, 0]  # both nodes serve on, unchanged
        assert _plan_version(r) == [-1, -1]


@pytest.mark.parametrize("kind", ["level", "status"])
async def test_a_bad_level_or_status_is_refused_by_the_controller_with_its_codec_error(
    mqtt, topic_prefix, kind
):
    topics = Topics(topic_prefix)
    controller = Controller(controller_config(), synthetic_calibration(), mqtt, pipe=topic_prefix)
    topic = topics.control_stage(1) if kind == "level" else topics.status("n1")
    bad = _bad_payloads(kind)
    stop = asyncio.Event()
    async with collecting(mqtt, topic_prefix) as col:
        task = asyncio.create_task(controller.run(stop))
        try:
            await asyncio.wait_for(controller.ready.wait(), 20)
            async with aiomqtt.Client(**mqtt.aiomqtt_kwargs()) as client:
                for payload, _ in bad:
                    await client.publish(topic, payload, qos=1)
                await wait_until(lambda: len(col.errors) == len(bad), what=f"the bad {kind}s")
                # and the controller serves on: a good one is taken
                good = codec.encode_json(kind, GOOD_BODIES[kind])
                await client.publish(topic, good, qos=1)
                if kind == "level":
                    await wait_until(lambda: controller.state.levels[1] == 1, what="level 1")
                else:
                    await wait_until(lambda: "n1" in controller.state.nodes, what="n1 online")
                    assert controller.state.nodes["n1"].state == "online"
        finally:
            stop.set()
            await asyncio.wait_for(task, 20)
    assert [e["reason"] for e in col.errors] == [
        f"controller ignored it: {reason}" for _, reason in bad
    ]
    assert all(e["node"] == "controller" and e["topic"] == topic for e in col.errors)
    assert controller.state.counts["bad_messages"] == len(bad)
