"""No lost images under faults: every accepted image gets exactly one result.

The camera journals every image until its result is seen and re-sends after a timeout;
results are de-duplicated by request id. Each test injects one fault mid-burst on a real
Mosquitto and checks that nothing accepted is lost, and reports how many duplicates the
journal suppressed.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess

from bus.connection import MqttSettings
from nodes.camera import Camera, rate_schedule
from pipeline.slicing import parse_cuts
from tests.helpers import collecting, node_process, running_nodes, stop_process, wait_until

RESEND_S = 2.0


def _args(mqtt: MqttSettings, pipe: str) -> list[str]:
    return [
        "--node-id",
        "n1",
        "--pipe",
        pipe,
        "--stage",
        "1",
        "--start",
        "2",
        "--end",
        "5",
        "--host",
        mqtt.host,
        "--port",
        str(mqtt.port),
        "--metrics-interval",
        "0.2",
    ]


async def _online(col, node: str, count: int) -> None:
    await wait_until(
        lambda: (
            sum(1 for s in col.statuses if s["node"] == node and s["state"] == "online") >= count
        ),
        60,
        f"{node} online",
    )


def _check_no_loss(report, cam: Camera, what: str) -> None:
    print(
        f"{what}: sent {report.sent}, results {report.completed}, re-sent {report.resent}, "
        f"duplicates suppressed {report.duplicates}"
    )
    assert report.sent == len(cam.shots)
    assert report.lost == 0 and report.completed == report.sent
    assert len(report.results) == report.sent


async def test_sigkill_a_node_mid_burst_loses_nothing(
    checkpoint, test_images, mqtt, topic_prefix, tmp_path
):
    bounds = parse_cuts("2", 5)
    async with (
        running_nodes(checkpoint, mqtt, topic_prefix, bounds[:1]),
        collecting(mqtt, topic_prefix) as col,
    ):
        proc = node_process(_args(mqtt, topic_prefix), tmp_path / "n1.log")
        try:
            await _online(col, "n1", 1)
            cam = Camera(
                mqtt,
                topic_prefix,
                test_images,
                rate_schedule(30.0, 90, n_images=500),
                resend_after_s=RESEND_S,
                drain_s=90,
            )
            task = asyncio.create_task(cam.run())
            await wait_until(lambda: cam.report.completed >= 15, 60, "first results")
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            proc = node_process(_args(mqtt, topic_prefix), tmp_path / "n1.log")
            report = await task
        finally:
            stop_process(proc)
    _check_no_loss(report, cam, "SIGKILL node")


async def test_sigstop_then_sigcont_a_node_loses_nothing(
    checkpoint, test_images, mqtt, topic_prefix, tmp_path
):
    bounds = parse_cuts("2", 5)
    async with (
        running_nodes(checkpoint, mqtt, topic_prefix, bounds[:1]),
        collecting(mqtt, topic_prefix) as col,
    ):
        proc = node_process(_args(mqtt, topic_prefix), tmp_path / "n1.log")
        try:
            await _online(col, "n1", 1)
            cam = Camera(
                mqtt,
                topic_prefix,
                test_images,
                rate_schedule(30.0, 90, n_images=500),
                resend_after_s=RESEND_S,
                drain_s=90,
            )
            task = asyncio.create_task(cam.run())
            await wait_until(lambda: cam.report.completed >= 15, 60, "first results")
            proc.send_signal(signal.SIGSTOP)
            # frozen until the camera has given up waiting and re-sent something
            await wait_until(lambda: cam.journal.stats().resent > 0, 30, "a re-send")
            proc.send_signal(signal.SIGCONT)
            report = await task
        finally:
            stop_process(proc)
    _check_no_loss(report, cam, "SIGSTOP/SIGCONT node")
    assert report.resent > 0


async def test_broker_restart_mid_burst_loses_nothing(
    checkpoint, test_images, broker_factory, topic_prefix
):
    broker = broker_factory(port=None)
    mqtt = MqttSettings(host=broker.host, port=broker.port)
    async with running_nodes(checkpoint, mqtt, topic_prefix, parse_cuts("2", 5)):
        cam = Camera(
            mqtt,
            topic_prefix,
            test_images,
            rate_schedule(30.0, 90, n_images=500),
            resend_after_s=RESEND_S,
            drain_s=90,
        )
        task = asyncio.create_task(cam.run())
        await wait_until(lambda: cam.report.completed >= 15, 60, "first results")
        broker.restart()  # persistence off: the broker forgets every queued message
        report = await task
    _check_no_loss(report, cam, "broker restart")


async def test_node_process_shuts_down_cleanly_on_sigterm(mqtt, topic_prefix, tmp_path):
    async with collecting(mqtt, topic_prefix) as col:
        proc = node_process(_args(mqtt, topic_prefix), tmp_path / "n1.log")
        await _online(col, "n1", 1)
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        await wait_until(lambda: col.statuses[-1]["state"] == "offline", 10, "offline status")
    assert code == 0
    assert col.statuses[-1]["reason"] == "shutdown"  # said goodbye, not the Last Will
