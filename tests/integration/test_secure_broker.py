"""The secure broker (``broker/secure.conf`` via ``broker.security``) on a real Mosquitto.

No anonymous access, one password per user, an ACL per role, TLS only. Mosquitto drops an
unauthorised PUBLISH silently (MQTT 3.1.1 has no reason code for it; the publisher still gets
its PUBACK), so non-delivery is asserted with a positive control: an authorised message on
the same topic, published after the forbidden one, must be the FIRST one a reader sees.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import ssl
import stat
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiomqtt
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from broker.launcher import MosquittoBroker, mqtt_handshake, wait_for_mqtt
from broker.security import (
    SecureSetup,
    make_ca,
    parse_placements,
    parse_users,
    prepare_secure_broker,
    render_acl,
)
from bus.connection import MqttSettings
from bus.topics import AclTopics, Topics
from nodes.camera import Camera, ImageSource, rate_schedule
from nodes.config import NodeConfig
from nodes.node import SliceNode
from pipeline import codec
from pipeline.errors import ConfigError
from pipeline.slicing import parse_cuts
from tests.conftest import BrokerFactory
from tests.helpers import DATA_DIR, REPO, LineReader, collecting, stop_process, wait_until

TIMEOUT = 10.0
USERS = "camera-cam0,camera-cam1,node-n0,node-n1,controller,observer"


@pytest.fixture(scope="module")
def secure(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[MosquittoBroker, SecureSetup]]:
    """One secure broker for the module: two cameras, two nodes, a controller and an
    observer on any pipe (``--acl-pipe +``: each test has its own pipe), TLS on a free port."""
    setup = prepare_secure_broker(tmp_path_factory.mktemp("secure-broker"), USERS, pipe="+")
    broker = MosquittoBroker(
        template=setup.config_template, run_dir=setup.run_dir, tls_context=setup.probe_context()
    )
    broker.start()
    try:
        yield broker, setup
    finally:
        broker.stop()


def _as(secure: tuple[MosquittoBroker, SecureSetup], user: str) -> MqttSettings:
    broker, setup = secure
    return setup.settings(user, broker.host, broker.port)


@asynccontextmanager
async def _client(
    settings: MqttSettings, timeout: float = TIMEOUT
) -> AsyncIterator[aiomqtt.Client]:
    async with aiomqtt.Client(**settings.aiomqtt_kwargs(), timeout=timeout) as client:
        yield client


async def _first_message(client: aiomqtt.Client) -> aiomqtt.Message:
    async with asyncio.timeout(TIMEOUT):
        async for message in client.messages:
            return message
    raise AssertionError("message iterator ended")


# ---- authentication and transport ----------------------------------------------------------


async def test_anonymous_and_wrong_passwords_are_refused(secure) -> None:
    broker, setup = secure
    anonymous = MqttSettings(host=broker.host, port=broker.port, tls_ca=setup.ca_cert)
    wrong = MqttSettings(
        host=broker.host,
        port=broker.port,
        tls_ca=setup.ca_cert,
        username="camera-cam0",
        password="not-the-password",
    )
    stranger = MqttSettings(
        host=broker.host, port=broker.port, tls_ca=setup.ca_cert, username="mallory", password="x"
    )
    for settings in (anonymous, wrong, stranger):
        with pytest.raises(aiomqtt.MqttCodeError, match=r"(?i)not authori"):
            async with _client(settings):
                pass
    async with _client(_as(secure, "camera-cam0")):  # the right password gets in
        pass


async def test_plain_mqtt_on_the_tls_port_fails(secure) -> None:
    broker, setup = secure
    assert not mqtt_handshake(broker.host, broker.port)
    log_start = broker.log_path.stat().st_size
    # aiomqtt does not notice the broker hanging up during CONNECT: it times out instead.
    with pytest.raises(aiomqtt.MqttError):
        async with _client(
            MqttSettings(
                host=broker.host,
                port=broker.port,
                username="camera-cam0",
                password=setup.passwords["camera-cam0"],
            ),
            timeout=1.0,
        ):
            pass
    assert "wrong version number" in broker.log_tail(log_start)
    # The readiness probe speaks TLS; a refusing CONNACK (no credentials) counts as up.
    assert mqtt_handshake(broker.host, broker.port, ssl_context=setup.probe_context())
    wait_for_mqtt(broker.host, broker.port, timeout=TIMEOUT, ssl_context=setup.probe_context())
    assert broker.url.startswith("mqtts://")


async def test_clients_verify_the_broker_certificate(secure, tmp_path: Path) -> None:
    broker, setup = secure
    by_name = MqttSettings(
        host="localhost",
        port=broker.port,
        username="observer",
        password=setup.passwords["observer"],
        tls_ca=setup.ca_cert,
    )
    async with _client(by_name):  # host name checked against the certificate's names
        pass
    other_ca, _ = make_ca(tmp_path / "other")
    impostor = MqttSettings(
        host=broker.host,
        port=broker.port,
        username="observer",
        password=setup.passwords["observer"],
        tls_ca=other_ca,
    )
    with pytest.raises(aiomqtt.MqttError, match=r"(?i)certificate"):
        async with _client(impostor):
            pass
    other = ssl.create_default_context(cafile=str(other_ca))
    assert not mqtt_handshake(broker.host, broker.port, ssl_context=other)


# ---- authorisation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("intruder", "suffix", "owner"),
    [
        ("camera-cam0", "control/stage/0", "controller"),  # a camera publishing control
        ("camera-cam0", "control/plan", "controller"),
        ("camera-cam0", "stage/1", "node-n0"),
        ("camera-cam0", "stage/0/cam1", "camera-cam1"),  # another camera's images
        ("camera-cam0", "errors/n0", "node-n0"),
        ("node-n0", "stage/0/cam0", "camera-cam0"),  # a node forging stage 0
        ("node-n0", "nodes/n1/status", "node-n1"),  # another node's status
        ("node-n0", "nodes/n1/metrics", "node-n1"),
        ("node-n0", "errors/n1", "node-n1"),  # an error under another node's name
        ("node-n0", "errors", "controller"),  # ... or the controller's
        ("node-n0", "control/stage/1", "controller"),
        ("observer", "results", "node-n1"),
        ("controller", "stage/0/cam0", "camera-cam0"),
    ],
)
async def test_forbidden_publish_is_not_delivered(
    secure, topic_prefix: str, intruder: str, suffix: str, owner: str
) -> None:
    topic = f"{Topics(topic_prefix).base}/{suffix}"
    async with (
        _client(_as(secure, "observer")) as reader,
        _client(_as(secure, intruder)) as bad,
        _client(_as(secure, owner)) as good,
    ):
        await reader.subscribe(topic, qos=1)
        await bad.publish(topic, b"forged", qos=1)  # PUBACKed, then dropped by the broker
        await good.publish(topic, b"genuine", qos=1)
        message = await _first_message(reader)
    assert message.payload == b"genuine", f"{intruder} could publish to {suffix}"


async def test_camera_reads_results_but_not_control(secure, topic_prefix: str) -> None:
    t = Topics(topic_prefix)
    async with (
        _client(_as(secure, "camera-cam0")) as camera,
        _client(_as(secure, "controller")) as controller,
        _client(_as(secure, "node-n1")) as node,
    ):
        await camera.subscribe(t.everything, qos=1)  # granted, but filtered by read rights
        await controller.publish(t.control_stage(0), b'{"level": 1}', qos=1)
        await node.publish(t.results, b'{"label": "fox"}', qos=1)
        message = await _first_message(camera)
    assert (message.topic.value, message.payload) == (t.results, b'{"label": "fox"}')


def test_a_node_will_cannot_speak_for_another_node(secure, topic_prefix: str) -> None:
    """The broker drops a Last Will on a topic its owner may not write."""
    broker, setup = secure
    t = Topics(topic_prefix)
    received: list[tuple[str, bytes]] = []
    got = threading.Event()

    def on_message(client: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
        received.append((message.topic, bytes(message.payload)))
        got.set()

    def connect(
        user: str, will: tuple[str, bytes] | None = None
    ) -> tuple[paho.Client, threading.Event]:
        client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
        client.username_pw_set(user, setup.passwords[user])
        client.tls_set(ca_certs=str(setup.ca_cert))
        if will is not None:
            client.will_set(will[0], will[1], qos=1)
        acked = threading.Event()
        client.on_connect = lambda *args: acked.set()
        client.on_subscribe = lambda *args: acked.set()
        client.on_message = on_message
        client.connect(broker.host, broker.port)
        return client, acked

    observer, acked = connect("observer")
    observer.loop_start()
    try:
        assert acked.wait(TIMEOUT), "observer did not connect"
        acked.clear()
        observer.subscribe(f"{t.base}/nodes/#", qos=1)
        assert acked.wait(TIMEOUT), "no SUBACK"
        for topic in (t.status("n1"), t.status("n0")):  # forged first, then the genuine one
            node, connected = connect("node-n0", will=(topic, b"will"))
            for _ in range(int(TIMEOUT / 0.05)):  # no network thread: nothing to join
                if connected.is_set():
                    break
                node.loop(timeout=0.05)
            assert connected.is_set(), "node-n0 did not connect"
            sock = node.socket()
            assert sock is not None
            sock.close()  # an unexpected drop: the broker sends the Will
        assert got.wait(TIMEOUT), "no Will delivered at all"
    finally:
        observer.disconnect()
        observer.loop_stop()
    assert received[0] == (t.status("n0"), b"will")


async def test_placements_pin_nodes_to_their_stage_and_reload_on_sighup(
    broker_factory: BrokerFactory, tmp_path: Path, topic_prefix: str
) -> None:
    run_dir = tmp_path / "placed"
    setup = prepare_secure_broker(
        run_dir, USERS, pipe=topic_prefix, placements=parse_placements("n0:0,n1:1")
    )
    broker = broker_factory(
        template=setup.config_template, run_dir=run_dir, tls_context=setup.probe_context()
    )
    t = Topics(topic_prefix)

    async def delivered(user: str, topic: str) -> bool:
        """Whether ``user``'s publish on ``topic`` reaches a reader (the controller's
        ``errors`` message after it is the positive control)."""
        async with (
            _client(setup.settings("observer", broker.host, broker.port)) as reader,
            _client(setup.settings(user, broker.host, broker.port)) as writer,
            _client(setup.settings("controller", broker.host, broker.port)) as control,
        ):
            await reader.subscribe(topic, qos=1)
            await reader.subscribe(t.errors, qos=1)
            await writer.publish(topic, b"probe", qos=1)
            await control.publish(t.errors, b"marker", qos=1)
            return (await _first_message(reader)).payload == b"probe"

    assert await delivered("node-n0", t.stage(1))  # n0 serves stage 0: writes stage 1
    assert not await delivered("node-n0", t.camera_stage("cam0"))  # reads it, never writes
    assert not await delivered("node-n0", t.stage(2))
    assert not await delivered("node-n0", t.results)
    assert await delivered("node-n1", t.results)  # n1 is last
    assert not await delivered("node-n1", t.stage(2))

    # Re-plan: n0 now serves the last stage. Regenerate the ACL, SIGHUP, and it applies.
    log_size = broker.log_path.stat().st_size
    prepare_secure_broker(
        run_dir, USERS, pipe=topic_prefix, placements=parse_placements("n1:0,n0:1")
    )
    broker.reload()
    await wait_until(
        lambda: "Reloading config" in broker.log_tail(log_size), TIMEOUT, "mosquitto to reload"
    )
    assert await delivered("node-n0", t.results)
    assert not await delivered("node-n0", t.stage(1))


async def test_client_certificates_when_required(
    broker_factory: BrokerFactory, tmp_path: Path
) -> None:
    setup = prepare_secure_broker(tmp_path / "mtls", "observer,camera-cam0", client_certs=True)
    broker = broker_factory(
        template=setup.config_template, run_dir=setup.run_dir, tls_context=setup.probe_context()
    )
    settings = setup.settings("camera-cam0", broker.host, broker.port)
    assert settings.tls_cert == setup.cert_dir / "camera-cam0.crt"
    async with _client(settings):
        pass
    without_cert = MqttSettings(
        host=broker.host,
        port=broker.port,
        username="camera-cam0",
        password=setup.passwords["camera-cam0"],
        tls_ca=setup.ca_cert,
    )
    with pytest.raises(aiomqtt.MqttError):
        async with _client(without_cert, timeout=1.0):
            pass
    assert "peer did not return a certificate" in broker.log_tail()


async def test_identity_is_the_user_not_the_client_id(secure, topic_prefix: str) -> None:
    """A camera that connects with node n0's client id still cannot speak for n0: the ACL
    names users, and the client id is whatever the client says (why no ``%c`` pattern)."""
    t = Topics(topic_prefix)
    node_client_id = f"edgeprune-{topic_prefix}-n0"
    async with (
        _client(_as(secure, "observer")) as reader,
        aiomqtt.Client(
            **_as(secure, "camera-cam0").aiomqtt_kwargs(), identifier=node_client_id
        ) as impostor,
    ):
        await reader.subscribe(t.status("n0"), qos=1)
        await impostor.publish(t.status("n0"), b"forged", qos=1)
        async with _client(_as(secure, "node-n0")) as node:
            await node.publish(t.status("n0"), b"genuine", qos=1)
            message = await _first_message(reader)
    assert message.payload == b"genuine"


async def test_a_node_cannot_write_another_pipes_results(
    broker_factory: BrokerFactory, tmp_path: Path, topic_prefix: str
) -> None:
    """With the ACL bound to one pipe (the default, ``--acl-pipe``), a node of that pipe
    cannot write the results (nor anything) of another pipe on the same broker."""
    mine, other = Topics(topic_prefix), Topics(f"{topic_prefix}-other")
    setup = prepare_secure_broker(tmp_path / "one-pipe", "node-n1,observer", pipe=mine.pipe)
    node_user, observer = parse_users("node-n1,observer")
    # the reader must see every pipe, or the test would prove nothing
    setup.acl_file.write_text(
        render_acl([node_user], pipe=mine.pipe) + render_acl([observer], pipe="+")
    )
    broker = broker_factory(
        template=setup.config_template, run_dir=setup.run_dir, tls_context=setup.probe_context()
    )
    async with (
        _client(setup.settings("observer", broker.host, broker.port)) as reader,
        _client(setup.settings("node-n1", broker.host, broker.port)) as node,
    ):
        await reader.subscribe(other.results, qos=1)
        await reader.subscribe(mine.results, qos=1)
        await node.publish(other.results, b"forged", qos=1)  # in order on one connection:
        await node.publish(mine.results, b"genuine", qos=1)  # the genuine one comes second
        message = await _first_message(reader)
    assert (message.topic.value, message.payload) == (mine.results, b"genuine")


# ---- the real components, each under its own account ----------------------------------------


async def test_pipeline_runs_on_the_secure_broker(
    secure, checkpoint, test_images: ImageSource, topic_prefix: str
) -> None:
    """Nodes, camera and a reader, each logged in as its own user: every image comes back."""
    bounds = parse_cuts("2", 5)
    nodes = [
        SliceNode(
            NodeConfig(
                node_id=f"n{i}",
                pipe=topic_prefix,
                stage=i,
                bounds=b,
                mqtt=_as(secure, f"node-n{i}"),
                ratios=(0.0,),
            ),
            checkpoint,
        )
        for i, b in enumerate(bounds)
    ]
    stop = asyncio.Event()
    tasks = [asyncio.create_task(n.run(stop)) for n in nodes]
    try:
        async with collecting(_as(secure, "observer"), topic_prefix) as col:
            await asyncio.wait_for(asyncio.gather(*(n.ready.wait() for n in nodes)), 60)
            await wait_until(
                lambda: {s["node"] for s in col.statuses if s["state"] == "online"} == {"n0", "n1"}
            )
            camera = Camera(
                _as(secure, "camera-cam0"),
                topic_prefix,
                test_images,
                rate_schedule(50.0, 10, n_images=100),
                resend_after_s=None,
                drain_s=30,
            )
            report = await camera.run()
            await wait_until(lambda: len(col.exits) >= 10, what="10 exits")
            assert len(col.result_counts()) == 10 and not col.errors
            # a node's error goes out on errors/<node>, which its own user may write
            async with _client(_as(secure, "node-n0")) as upstream:
                await upstream.publish(Topics(topic_prefix).stage(1), b"\xc1 no msgpack", qos=1)
            await wait_until(lambda: bool(col.errors), what="n1's error")
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert report.completed == 10 and report.lost == 0
    assert [(e["node"], e["reason"].split(":")[0]) for e in col.errors] == [
        ("n1", "malformed msgpack")
    ]


async def test_camera_cli_publishes_as_its_users_camera(secure, topic_prefix: str) -> None:
    """``edgeprune camera`` logged in as camera-cam1 replays a trace whose camera ids are
    others (``raspberry-pi-2@...``): every image goes out as cam1, on cam1's own topic."""
    broker, setup = secure
    t = Topics(topic_prefix)
    env = {**os.environ, **setup.env("camera-cam1", broker.host, broker.port)}
    async with _client(_as(secure, "observer")) as reader:
        await reader.subscribe(t.camera_stage_all, qos=1)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "edgeprune",
            "camera",
            "--pipe",
            topic_prefix,
            "--data-dir",
            str(DATA_DIR),
            "--trace",
            "dsail_porini",
            "--compression",
            "1000",
            "--max-idle",
            "0.1",
            "--max-images",
            "3",
            "--no-track",
            cwd=REPO,
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        seen = []
        async with asyncio.timeout(60):
            async for message in reader.messages:
                seen.append((message.topic.value, codec.decode_stage(message.payload).camera))
                if len(seen) == 3:
                    break
        _, stderr = await proc.communicate()
    assert proc.returncode == 0, stderr.decode()
    assert seen == [(t.camera_stage("cam1"), "cam1")] * 3


# ---- the files -------------------------------------------------------------------------------


def test_files_are_private_and_passwords_survive_a_rerun(tmp_path: Path) -> None:
    setup = prepare_secure_broker(tmp_path / "run", "camera-cam0,node-n0,observer")
    private = [
        setup.credentials_file,
        setup.password_file,
        setup.acl_file,
        setup.cert_dir / "ca.key",
        setup.cert_dir / "server.key",
    ]
    env_files = setup.write_env_files("127.0.0.1", 8883)
    for path in [*private, *env_files.values()]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(setup.run_dir.stat().st_mode) == 0o700
    passwd = setup.password_file.read_text()
    for user, password in setup.passwords.items():
        assert re.search(rf"^{user}:\$7\$", passwd, re.M), "PBKDF2-SHA512 hash expected"
        assert password not in passwd
    env = dict(line.split("=", 1) for line in env_files["node-n0"].read_text().splitlines())
    assert env["EDGEPRUNE_MQTT_USERNAME"] == "node-n0"
    assert env["EDGEPRUNE_MQTT_TLS_CA"] == str(setup.ca_cert)
    text = setup.config_template.read_text()
    assert "@" not in "".join(line for line in text.splitlines() if not line.startswith("#"))
    assert "allow_anonymous false" in text and f"acl_file {setup.acl_file}" in text

    ca = setup.ca_cert.read_bytes()
    again = prepare_secure_broker(tmp_path / "run", "camera-cam0,node-n0,observer,node-n1")
    assert {u: again.passwords[u] for u in setup.passwords} == dict(setup.passwords)
    assert again.ca_cert.read_bytes() == ca
    assert "user node-n1" in again.acl_file.read_text()


def test_user_names_carry_their_role_and_identity() -> None:
    users = parse_users("camera-north,node-n0,controller,observer")
    assert [(u.role, u.node, u.camera) for u in users] == [
        ("camera", None, "north"),
        ("node", "n0", None),
        ("controller", None, None),
        ("observer", None, None),
    ]
    for bad in ("admin", "node-", "camera", "camera-", "camera-a,camera-a", "node-a/b", ""):
        with pytest.raises(ConfigError):
            parse_users(bad)
    acl = render_acl(parse_users("node-n0,camera-north"), pipe="farm")
    assert "topic readwrite edgeprune/farm/nodes/n0/#" in acl
    assert "topic write edgeprune/farm/errors/n0" in acl
    assert "topic write edgeprune/farm/stage/0/north" in acl
    assert "nodes/+" not in acl and AclTopics("+").everything not in acl and "errors/+" not in acl
    assert "stage/0\n" not in acl and "stage/#" not in acl  # no way into another's stage 0
    assert "pattern" not in acl  # identities are literal: see render_acl


def test_least_privilege_is_the_default() -> None:
    """Without --acl-pipe, the users are bound to the default pipe, as every component is."""
    acl = render_acl(parse_users("camera-cam0,node-n0,controller,observer"))
    topics = [line.split()[-1] for line in acl.splitlines() if line.startswith("topic ")]
    assert all(t.startswith(f"{Topics().base}/") or t == "$SYS/#" for t in topics), topics


# ---- edgeprune broker --secure -----------------------------------------------------------------


async def test_cli_secure_prints_where_the_credentials_are(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "cli"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edgeprune",
            "broker",
            "--secure",
            "--port",
            "0",
            "--run-dir",
            str(run_dir),
            "--users",
            "camera-cam0,node-n0,observer",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines = LineReader(proc.stdout).until(lambda line: "stop with Ctrl-C" in line, 30.0)
        out = "".join(lines)
        match = re.search(r"Mosquitto listening on mqtts://127\.0\.0\.1:(\d+)", out)
        assert match, out
        assert f"{run_dir / 'credentials.json'} (mode 0600)" in out
        env_file = run_dir / "credentials" / "node-n0.env"
        assert f"set -a; . {run_dir / 'credentials' / 'camera-cam0.env'}; set +a" in out
        env = dict(line.split("=", 1) for line in env_file.read_text().splitlines())
        assert env["EDGEPRUNE_MQTT_PORT"] == match.group(1)
        assert env["EDGEPRUNE_MQTT_PASSWORD"] not in out  # never printed
        # What every component does with that file: the CLI's option parsing, from the env.
        from edgeprune.commands._common import mqtt_settings

        for key, value in env.items():
            monkeypatch.setenv(key, value)
        settings = mqtt_settings(argparse.Namespace())
        assert (settings.username, settings.tls_ca) == ("node-n0", run_dir / "certs" / "ca.crt")
        async with _client(settings):
            pass
        proc.send_signal(signal.SIGINT)
        assert proc.wait(TIMEOUT) == 0
    finally:
        stop_process(proc, timeout=15)  # SIGTERM first: the CLI stops its mosquitto
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
