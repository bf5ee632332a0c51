"""The Mosquitto launcher, its configs and `edgeprune broker`, against real brokers.

Tests that restart, stop or misconfigure a broker use ``broker_factory``; the session broker
(``mosquitto``) only carries traffic. No sleeps as synchronisation: events, and polls with a
deadline.
"""

from __future__ import annotations

import asyncio
import os
import re
import selectors
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

import broker.launcher as broker_module
from broker.launcher import (
    BROKER_DIR,
    MosquittoBroker,
    free_port,
    mqtt_handshake,
    render_config,
    wait_for_mqtt,
)
from bus.topics import Topics
from pipeline.errors import BrokerError
from tests.helpers import stop_process

BrokerFactory = Callable[..., MosquittoBroker]  # the broker_factory fixture (tests/conftest.py)
REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 10.0


# ---- helpers ------------------------------------------------------------------------------


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (a reaped child does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_until(condition: Callable[[], bool], timeout: float = TIMEOUT) -> bool:
    """Poll ``condition()`` until true or ``timeout``; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)


class PahoProbe:
    """A paho client on a background thread that records connects, disconnects and messages."""

    def __init__(self, broker: MosquittoBroker) -> None:
        self.client_id = f"edgeprune-test-{uuid.uuid4().hex[:8]}"
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=paho.MQTTv311,
        )
        self.connects = 0
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.subscribed = threading.Event()
        self.messages: list[paho.MQTTMessage] = []
        self.got_message = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        # paho's loop thread reconnects on its own after an unexpected disconnect.
        self.client.reconnect_delay_set(min_delay=0.05, max_delay=0.05)  # type: ignore[arg-type]
        self._broker = broker

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self.connects += 1
        self.disconnected.clear()
        self.connected.set()

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self.connected.clear()
        self.disconnected.set()

    def _on_subscribe(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        self.subscribed.set()

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        self.messages.append(message)
        self.got_message.set()

    def __enter__(self) -> PahoProbe:
        self.client.connect(self._broker.host, self._broker.port, keepalive=30)
        self.client.loop_start()
        assert self.connected.wait(TIMEOUT), "paho client did not connect"
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def subscribe(self, topic: str, qos: int = 1) -> None:
        self.subscribed.clear()
        self.client.subscribe(topic, qos=qos)
        assert self.subscribed.wait(TIMEOUT), f"no SUBACK for {topic}"


async def first_message(client: aiomqtt.Client, timeout: float = TIMEOUT) -> aiomqtt.Message:
    """The next message the client receives, or TimeoutError."""
    async with asyncio.timeout(timeout):
        async for message in client.messages:
            return message
    raise AssertionError("message iterator ended")


@contextmanager
def broker_cli(*args: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """Run ``edgeprune broker ARGS`` and yield (process, its first stdout line)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgeprune", "--log-level", "INFO", "broker", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            ready = sel.select(timeout=30.0)  # includes importing the whole CLI
        assert ready, "edgeprune broker printed nothing"
        yield proc, proc.stdout.readline()
    finally:
        stop_process(proc, timeout=15)  # SIGTERM first: the CLI stops its mosquitto
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


# ---- the session broker carries traffic ---------------------------------------------------


async def test_publish_subscribe_round_trip(mosquitto: MosquittoBroker, topic_prefix: str) -> None:
    topic = Topics(topic_prefix).results
    async with (
        aiomqtt.Client(mosquitto.host, mosquitto.port) as sub,
        aiomqtt.Client(mosquitto.host, mosquitto.port) as pub,
    ):
        await sub.subscribe(topic, qos=1)
        await pub.publish(topic, b'{"label": "fox"}', qos=1)
        message = await first_message(sub)
    assert message.topic.value == topic
    assert message.payload == b'{"label": "fox"}'


async def test_five_megabyte_message_goes_through(
    mosquitto: MosquittoBroker, topic_prefix: str
) -> None:
    topic = Topics(topic_prefix).stage(1)
    payload = os.urandom(5_000_000)
    async with (
        aiomqtt.Client(mosquitto.host, mosquitto.port) as sub,
        aiomqtt.Client(mosquitto.host, mosquitto.port) as pub,
    ):
        await sub.subscribe(topic, qos=1)
        await pub.publish(topic, payload, qos=1)
        message = await first_message(sub)
    assert message.payload == payload


def test_message_over_max_packet_size_is_refused(
    mosquitto: MosquittoBroker, topic_prefix: str
) -> None:
    """The broker disconnects the sender and delivers nothing; later traffic still flows."""
    topic = Topics(topic_prefix).stage(1)
    too_big = b"x" * (mosquitto.max_packet_size + 64 * 1024)
    with PahoProbe(mosquitto) as sub:
        sub.subscribe(topic)
        with PahoProbe(mosquitto) as sender:
            sender.client.publish(topic, too_big, qos=1)
            assert sender.disconnected.wait(TIMEOUT), "oversized publish did not disconnect"
            sender.client.disconnect()  # no auto-reconnect that would resend it
        with PahoProbe(mosquitto) as pub:
            pub.client.publish(topic, b"after", qos=1)
            assert sub.got_message.wait(TIMEOUT)
    # The first (and only) message the subscriber saw is the small one.
    assert [m.payload for m in sub.messages] == [b"after"]
    assert (
        f"Client {sender.client_id} disconnected due to oversize packet"
        in mosquitto.log_path.read_text()
    )


# ---- lifecycle, on brokers owned by one test ----------------------------------------------


def test_restart_keeps_port_and_clients_reconnect(
    broker_factory: BrokerFactory, topic_prefix: str
) -> None:
    broker = broker_factory()
    port, pid = broker.port, broker.pid
    topic = Topics(topic_prefix).control_stage(0)
    with PahoProbe(broker) as node:
        node.subscribe(topic)
        broker.restart()
        assert broker.port == port
        assert broker.pid is not None and broker.pid != pid
        assert pid is not None and not pid_alive(pid)
        # paho's loop thread reconnects by itself; the subscription must be renewed.
        assert wait_until(lambda: node.connects >= 2), "client did not reconnect after restart"
        node.subscribe(topic)
        with PahoProbe(broker) as controller:
            controller.client.publish(topic, b'{"level": 2}', qos=1)
            assert node.got_message.wait(TIMEOUT)
    assert node.messages[-1].payload == b'{"level": 2}'


@pytest.mark.parametrize("persistence", [True, False])
def test_retained_messages_survive_restart_only_with_persistence(
    broker_factory: BrokerFactory, topic_prefix: str, persistence: bool
) -> None:
    broker = broker_factory(persistence=persistence)
    topic = Topics(topic_prefix).plan
    with PahoProbe(broker) as controller:
        controller.client.publish(topic, b'{"version": 7}', qos=1, retain=True).wait_for_publish(
            TIMEOUT
        )
    broker.restart()
    with PahoProbe(broker) as node:
        node.subscribe(topic)
        # A retained message is queued right after the SUBACK, so it would arrive before this.
        with PahoProbe(broker) as marker:
            marker.client.publish(topic, b"marker", qos=1)
            assert node.got_message.wait(TIMEOUT)
        assert wait_until(lambda: any(m.payload == b"marker" for m in node.messages))
    first = node.messages[0]
    if persistence:
        assert (first.payload, first.retain) == (b'{"version": 7}', True)
    else:
        assert first.payload == b"marker"


def test_stop_leaves_no_process(broker_factory: BrokerFactory) -> None:
    broker = broker_factory()
    pid, port = broker.pid, broker.port
    assert pid is not None and pid_alive(pid)
    broker.stop()
    assert wait_until(lambda: not pid_alive(pid)), f"mosquitto pid {pid} still exists"
    assert broker.pid is None and not broker.running
    assert not mqtt_handshake(broker.host, port, timeout=0.5)
    broker.stop()  # idempotent


def test_context_manager_owns_a_temporary_run_dir() -> None:
    with MosquittoBroker() as broker:
        run_dir, pid = broker.run_dir, broker.pid
        assert broker.url == f"mqtt://127.0.0.1:{broker.port}"
        assert mqtt_handshake(broker.host, broker.port)
        assert "listener" in broker.config_path.read_text()
        assert "mosquitto version" in broker.log_path.read_text()
    assert pid is not None and wait_until(lambda: not pid_alive(pid))
    assert not run_dir.exists()


def test_docker_config_is_accepted_by_this_mosquitto(broker_factory: BrokerFactory) -> None:
    broker = broker_factory(template=BROKER_DIR / "docker.conf")
    assert mqtt_handshake(broker.host, broker.port)


# ---- failures are BrokerErrors that say what to do ----------------------------------------


def test_wrong_binary_path_gives_install_hint() -> None:
    broker = MosquittoBroker(binary="/nonexistent/bin/mosquitto")
    with pytest.raises(BrokerError, match=r"make setup.*apt-get install mosquitto"):
        broker.start()
    assert not broker.running


def test_port_in_use_reports_the_log(
    mosquitto: MosquittoBroker, broker_factory: BrokerFactory
) -> None:
    with pytest.raises(BrokerError, match="Address already in use"):
        broker_factory(port=mosquitto.port)


def test_bad_config_reports_the_log(tmp_path: Path, broker_factory: BrokerFactory) -> None:
    template = tmp_path / "bad.conf"
    template.write_text("listener 1883 127.0.0.1\nno_such_option 1\n")
    with pytest.raises(BrokerError, match="no_such_option"):
        broker_factory(template=template)


def test_free_port_race_is_retried(
    mosquitto: MosquittoBroker, broker_factory: BrokerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A port taken between picking and binding makes start() pick another one."""
    ports = iter([mosquitto.port])  # taken: the session broker holds it

    def flaky_free_port(host: str = "127.0.0.1") -> int:
        return next(ports, None) or free_port(host)

    monkeypatch.setattr(broker_module, "free_port", flaky_free_port)
    broker = broker_factory()
    assert broker.port != mosquitto.port
    assert mqtt_handshake(broker.host, broker.port)


def test_wait_for_mqtt(mosquitto: MosquittoBroker) -> None:
    wait_for_mqtt(mosquitto.host, mosquitto.port, timeout=TIMEOUT)
    with pytest.raises(BrokerError, match="no MQTT broker answered"):
        wait_for_mqtt("127.0.0.1", free_port(), timeout=0.3)


def test_render_config_replaces_only_what_it_owns(tmp_path: Path) -> None:
    template = (BROKER_DIR / "dev.conf").read_text()
    text = render_config(
        template,
        host="127.0.0.1",
        port=4242,
        max_packet_size=1000,
        persistence=True,
        run_dir=tmp_path,
        user="nobody",
    )
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    keys = [line.split()[0] for line in lines]
    assert "listener 4242 127.0.0.1" in lines
    assert "max_packet_size 1000" in lines
    assert f"persistence_location {tmp_path}/" in lines
    for key in ("listener", "max_packet_size", "persistence", "user"):
        assert keys.count(key) == 1, key
    assert "max_queued_bytes 67108864" in lines  # untouched template line


# ---- edgeprune broker ---------------------------------------------------------------------


def test_cli_runs_until_sigint(tmp_path: Path) -> None:
    with broker_cli("--port", "0", "--run-dir", str(tmp_path)) as (proc, line):
        match = re.search(
            r"Mosquitto listening on mqtt://127\.0\.0\.1:(\d+) \(config: (.+), log: (.+)\)", line
        )
        assert match, line
        port = int(match.group(1))
        assert Path(match.group(2)) == tmp_path / "mosquitto.conf"
        assert mqtt_handshake("127.0.0.1", port)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(TIMEOUT) == 0
    assert not mqtt_handshake("127.0.0.1", port, timeout=0.5)
    assert "mosquitto version" in (tmp_path / "mosquitto.log").read_text()


def test_cli_print_config(capsys: pytest.CaptureFixture[str]) -> None:
    from edgeprune.cli import build_parser

    args = build_parser().parse_args(
        ["broker", "--port", "1999", "--max-packet-size", "5000", "--print-config"]
    )
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "listener 1999 127.0.0.1" in out
    assert "max_packet_size 5000" in out
