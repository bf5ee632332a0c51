"""bus.session on a real Mosquitto that is SIGKILLed under a running pipeline and started again
on the same port (no persistence: it forgets every subscription and retained message).

Two slice nodes, a camera and a controller, all built on :class:`bus.session.Session`, must
each reconnect, subscribe again (messages published after the restart reach them), publish
their retained ``online`` status again, and lose nothing: every image the camera sent gets
exactly one result."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from bus.connection import MqttSettings
from bus.session import Received, Session
from bus.topics import Topics
from controller.config import ControllerConfig
from controller.service import Controller
from nodes.camera import Camera, rate_schedule
from pipeline import codec
from pipeline.slicing import parse_cuts
from tests.helpers import nominal_calibration, running_nodes, wait_until

IMAGES = 80


async def _retained_statuses(mqtt: MqttSettings, topics: Topics) -> dict[str, dict[str, object]]:
    """The retained status messages a client connecting now receives, by topic."""
    got: dict[str, dict[str, object]] = {}
    wanted = 3  # n0, n1 and the controller

    def keep(message: Received) -> None:
        if message.retain and message.payload:
            got[message.topic] = codec.decode_json(message.payload, expect_kind="status")

    async with Session(
        mqtt,
        name="observer",
        subscriptions=[(topics.status_all, 1), (topics.controller_status, 1)],
        on_message=keep,
    ):
        await wait_until(lambda: len(got) >= wanted, 20, "the retained statuses")
    return got


@pytest.mark.timeout(240)
async def test_node_camera_and_controller_survive_a_broker_sigkill(
    checkpoint, test_images, broker_factory, topic_prefix
):
    broker = broker_factory(port=None)
    mqtt = MqttSettings(host=broker.host, port=broker.port)
    topics = Topics(topic_prefix)
    bounds = parse_cuts("2", 5)
    controller = Controller(
        ControllerConfig(slo_ms=1000.0, policy="static"),
        nominal_calibration(checkpoint, [(b.start, b.end) for b in bounds], (0.0, 0.5)),
        mqtt,
        pipe=topic_prefix,
    )
    stop = asyncio.Event()
    controlling = asyncio.create_task(controller.run(stop))
    try:
        async with running_nodes(
            checkpoint, mqtt, topic_prefix, bounds, metrics_interval_s=0.2
        ) as nodes:
            await asyncio.wait_for(controller.ready.wait(), 20)
            before = await _retained_statuses(mqtt, topics)
            assert {b["state"] for b in before.values()} == {"online"}

            cam = Camera(
                mqtt,
                topic_prefix,
                test_images,
                rate_schedule(20.0, IMAGES, n_images=len(test_images)),
                resend_after_s=2.0,
                drain_s=90,
            )
            trace = asyncio.create_task(cam.run())
            await wait_until(lambda: cam.report.completed >= 15, 60, "results before the kill")
            exits_before = controller.state.counts["exits"]
            os.kill(broker.pid or 0, signal.SIGKILL)
            broker.restart()  # same port, empty: no subscriptions, no retained messages

            # each reconnects (a second connection) and is online again
            services = [*(n._session for n in nodes), cam._session, controller._session]
            await wait_until(
                lambda: all(s.connections >= 2 and s.connected.is_set() for s in services),
                30,
                "every session reconnected",
            )
            report = await trace
            # resubscribed: the controller still sees exits, which came after the restart
            await wait_until(
                lambda: controller.state.counts["exits"] > exits_before,
                30,
                "exits reaching the controller after the restart",
            )
            after = await _retained_statuses(mqtt, topics)
    finally:
        stop.set()
        await asyncio.gather(controlling, return_exceptions=True)

    # the restarted broker knew no statuses: these were published again after the reconnect
    assert set(after) == {topics.status("n0"), topics.status("n1"), topics.controller_status}
    assert all(body["state"] == "online" for body in after.values()), after
    # nothing accepted is lost: every image gets exactly one result
    assert report.sent == IMAGES
    assert report.completed == report.sent and report.lost == 0
    assert sorted(report.results) == sorted(f"cam0-{cam.run_id}-{seq:06d}" for seq in range(IMAGES))
    # images sent after the restart reached the nodes (they subscribed again)
    assert max(int(rid.rsplit("-", 1)[1]) for rid in report.results) == IMAGES - 1


async def test_a_session_publishes_what_it_queued_while_the_broker_was_away(
    broker_factory, topic_prefix
):
    """The outbox: messages published while disconnected go out, in order, after the
    reconnect; the receiving session subscribed again on its own."""
    broker = broker_factory(port=None)
    mqtt = MqttSettings(host=broker.host, port=broker.port)
    topic = f"{Topics(topic_prefix).base}/outbox"
    received: list[bytes] = []
    async with (
        Session(
            mqtt,
            name="receiver",
            subscriptions=[(topic, 1)],
            on_message=lambda m: received.append(m.payload),
            reconnect_first_s=0.05,
            reconnect_max_s=0.1,
        ) as receiver,
        # the receiver's session is clean: it must be back and subscribed before the sender
        # flushes its outbox, so the sender retries its connection far less often
        Session(mqtt, name="sender", reconnect_first_s=3.0, reconnect_max_s=3.0) as sender,
    ):
        await asyncio.wait_for(
            asyncio.gather(receiver.connected.wait(), sender.connected.wait()), 10
        )
        os.kill(broker.pid or 0, signal.SIGKILL)
        await wait_until(lambda: not sender.connected.is_set(), 10, "the sender to see the loss")
        acks = [sender.publish(topic, str(i).encode()) for i in range(20)]
        assert sender.pending == 20
        broker.restart()
        await asyncio.wait_for(asyncio.gather(*acks), 30)
        await wait_until(lambda: len(received) >= 20, 20, "every queued message")
    assert received == [str(i).encode() for i in range(20)]
    assert sender.pending == 0


async def test_a_connected_session_hands_a_message_to_the_client_at_once(
    mosquitto, topic_prefix, monkeypatch
):
    """publish() while connected hands the message over itself (the per-message path has no
    hop through a publisher task): the client is publishing it by the time the caller next
    yields to the loop once, and a window of 2 still delivers many messages in order."""
    import aiomqtt

    mqtt = MqttSettings(host=mosquitto.host, port=mosquitto.port)
    topic = f"{Topics(topic_prefix).base}/at-once"
    handed: list[str] = []
    publish = aiomqtt.Client.publish

    async def recording_publish(self, topic, payload=None, *args, **kwargs):  # type: ignore[no-untyped-def]
        handed.append(topic)
        await publish(self, topic, payload, *args, **kwargs)

    monkeypatch.setattr(aiomqtt.Client, "publish", recording_publish)
    received: list[bytes] = []
    async with (
        Session(
            mqtt,
            name="receiver",
            subscriptions=[(topic, 1)],
            on_message=lambda m: received.append(m.payload),
        ) as receiver,
        Session(mqtt, name="sender", publish_window=2) as sender,
    ):
        await asyncio.wait_for(
            asyncio.gather(receiver.connected.wait(), sender.connected.wait()), 10
        )
        ack = sender.publish(topic, b"first")
        await asyncio.sleep(0)  # one turn of the loop: the task made by publish() runs
        assert handed == [topic]
        await asyncio.wait_for(ack, 10)
        acks = [sender.publish(topic, str(i).encode()) for i in range(50)]
        await asyncio.wait_for(asyncio.gather(*acks), 20)
        await wait_until(lambda: len(received) >= 51, 20, "every message")
    assert received == [b"first", *(str(i).encode() for i in range(50))]
    assert sender.pending == 0
