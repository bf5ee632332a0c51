"""docker-compose.yml and the Dockerfile, without a Docker engine.

(a) ``docker-compose config`` accepts the file, and the normalised config has the services,
health checks, volumes and environment the deployment relies on.
(b) Every service's command line, taken from that config, runs LOCALLY against the session
Mosquitto with the environment the compose file gives it (only host, port and pipe changed),
in a directory laid out like the image's /app: the nodes come online (and their health checks
say so), the camera's images all come back as results, the controller watches the whole run
and writes its report, and everything stops cleanly.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from broker.launcher import MosquittoBroker
from broker.security import prepare_secure_broker
from bus.connection import MqttSettings
from bus.topics import Topics
from tests.conftest import BrokerFactory
from tests.helpers import (
    DATA_DIR,
    REPO,
    clear_retained,
    collecting,
    good_json,
    stop_process,
    wait_until,
)

COMPOSE_FILE = REPO / "docker-compose.yml"
SMOKE_IMAGES = 5
SERVICES = ("controller", "node0", "node1")  # long-running, health-checked
JOBS = ("camera", "calibrate")  # run to completion
PYTHON_SERVICES = (*SERVICES, *JOBS)


# ---- reading the compose file ----------------------------------------------------------------


def _parse_yaml(text: str) -> Any:
    """YAML -> Python: PyYAML if this venv has it, else the interpreter docker-compose (v1)
    runs on, which always has it."""
    try:
        import yaml  # type: ignore[import-untyped]
    except ImportError:
        compose = shutil.which("docker-compose")
        shebang = Path(compose).read_text(errors="replace").splitlines()[0] if compose else ""
        python = shebang[2:].strip() if shebang.startswith("#!") else ""
        if not python or "python" not in python:
            pytest.skip(
                "no YAML parser: add pyyaml to the dev extras (docker-compose v1 "
                "would bring one, but it is not installed)"
            )
        out = subprocess.run(
            [
                *python.split(),
                "-c",
                "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)",
            ],
            input=text,
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )
        return json.loads(out.stdout)
    return yaml.safe_load(text)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The normalised config from ``docker-compose config`` (camera images set to 5)."""
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose is not installed (Debian: apt-get install docker-compose)")
    env = {**os.environ, "EDGEPRUNE_CAMERA_IMAGES": str(SMOKE_IMAGES)}
    proc = subprocess.run(
        ["docker-compose", "-f", str(COMPOSE_FILE), "config"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, f"docker-compose config failed:\n{proc.stderr}"
    config = _parse_yaml(proc.stdout)
    assert isinstance(config, dict)
    return config


def _unescape(arg: str) -> str:
    """Compose writes a literal ``$`` as ``$$``; the container sees one."""
    return arg.replace("$$", "$")


# ---- (a) the file --------------------------------------------------------------------------


def test_compose_config_has_the_cluster(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"broker", *PYTHON_SERVICES}

    broker = services["broker"]
    assert broker["image"] == "eclipse-mosquitto:2"
    assert f"{REPO}/broker/docker.conf:/mosquitto/config/mosquitto.conf:ro" in broker["volumes"]
    assert (REPO / "broker" / "docker.conf").is_file()
    assert any(p.startswith("127.0.0.1:1883:1883") for p in broker["ports"]), (
        "the anonymous broker must be published on loopback only"
    )
    check = [_unescape(a) for a in broker["healthcheck"]["test"]]
    assert check[:2] == ["CMD", "mosquitto_sub"] and "$SYS/broker/version" in check

    for name in PYTHON_SERVICES:
        svc = services[name]
        assert svc["image"] == "edgeprune:latest" and svc["build"]["context"] == str(REPO)
        assert svc["command"][0] == "edgeprune", name
        env = svc["environment"]
        assert (env["EDGEPRUNE_MQTT_HOST"], env["EDGEPRUNE_MQTT_PORT"]) == ("broker", "1883")
        volumes = svc["volumes"]
        assert f"{REPO}/models:/app/models:ro" in volumes, name  # checkpoints
        assert f"{REPO}/runs:/app/runs:rw" in volumes, name  # calibration and reports
        if name in JOBS:
            assert svc["healthcheck"]["test"] == ["NONE"] and svc["restart"] == "no", name
        else:
            assert svc["healthcheck"]["test"] == ["CMD", "edgeprune", "health"], name
            assert svc["restart"] == "unless-stopped"
            assert svc["depends_on"] == {"broker": {"condition": "service_healthy"}}
    camera = services["camera"]
    assert {k: v["condition"] for k, v in camera["depends_on"].items()} == {
        "broker": "service_healthy",
        "node0": "service_healthy",
        "node1": "service_healthy",
    }
    assert camera["command"][-2:] == ["--max-images", str(SMOKE_IMAGES)]  # interpolated
    calibrate = services["calibrate"]
    assert calibrate["profiles"] == ["setup"] and not calibrate["depends_on"]  # no broker
    out = calibrate["command"][calibrate["command"].index("--out") + 1]
    controller = services["controller"]["command"]
    assert controller[controller.index("--calibration") + 1] == out == "runs/calibration.json"
    assert controller[controller.index("--report") + 1].startswith("runs/")

    for name in ("node0", "node1"):
        cmd = services[name]["command"]
        assert cmd[1] == "node"
        node_id = cmd[cmd.index("--node-id") + 1]
        assert services[name]["environment"]["EDGEPRUNE_NODE_ID"] == node_id, (
            "the health check's node id must match --node-id"
        )
        checkpoint = cmd[cmd.index("--checkpoint") + 1]
        assert (REPO / checkpoint).is_file(), checkpoint


def test_dockerfile_installs_torch_first_then_the_project() -> None:
    lines = [
        line.strip()
        for line in (REPO / "Dockerfile").read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    assert lines[0] == "FROM python:3.11-slim"
    text = "\n".join(lines)
    torch = text.index('pip install "torch==${TORCH_VERSION}"')
    assert "ARG TORCH_VERSION=2.13.0" in text
    assert text.index("RUN pip install .") > torch
    assert "COPY models/ models/" in text and "COPY traces/ traces/" in text
    # the package ships the default model through a link into models/: copied before install
    assert text.index("COPY models/ models/") < text.index("RUN pip install .")
    assert "USER edgeprune" in text
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {"runs/", ".venv", "data/"} <= set(ignored)  # no secrets or caches in the image


# ---- (b) the command lines, run here -----------------------------------------------------


def _app_dir(tmp_path: Path) -> Path:
    """A directory laid out like the image's /app: models (the read-only volume), data, and
    runs (the read-write volume) holding a calibration for the compose file's two slices.

    The calibration is synthetic (10 ms per slice, linear in the ratio; accuracy 0.98
    unpruned): the `calibrate` service would take minutes, and this smoke run checks wiring,
    not control decisions (tests/integration/test_controller.py does those)."""
    from pipeline.calibration import Calibration, SliceLatency
    from pipeline.calibration.accuracy import LogisticAccuracyFit
    from pipeline.calibration.latency import LinearFit

    app = tmp_path / "app"
    (app / "runs").mkdir(parents=True)
    (app / "models").symlink_to(REPO / "models")
    (app / "data").symlink_to(DATA_DIR.resolve())
    ratios = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
    fit = LinearFit(a=-0.010, b=0.010, r2=1.0)
    slices = tuple(
        SliceLatency(i, start, end, "synthetic", tuple((r, fit.predict(r)) for r in ratios), fit)
        for i, (start, end) in enumerate(((0, 2), (2, 5)))
    )
    accuracy = LogisticAccuracyFit(g=(-2.0, -2.0), d=-4.0, max_abs_error=0.0)
    Calibration(
        ratios,
        slices,
        (),
        accuracy,
        "synthetic",
        "synthetic",
        10,
        meta={"note": "tests/integration/test_compose.py"},
    ).save(app / "runs" / "calibration.json")
    return app


def _local_env(
    service: dict[str, Any], broker: MosquittoBroker, pipe: str, app: Path
) -> dict[str, str]:
    """The service's compose environment, with only host, port and pipe pointed here."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEPRUNE_MQTT_")}
    env.update({k: str(v) for k, v in service["environment"].items()})
    assert env["EDGEPRUNE_MQTT_HOST"] == "broker"
    env.update(
        EDGEPRUNE_MQTT_HOST=broker.host,
        EDGEPRUNE_MQTT_PORT=str(broker.port),
        EDGEPRUNE_MQTT_PIPE=pipe,
        EDGEPRUNE_DATA_DIR=str(app / "data"),
        PYTHONPATH=str(REPO),
    )  # the image's ENV and its installed package
    return env


def _local_argv(argv: list[str]) -> list[str]:
    """``edgeprune ...`` / ``python ...`` from a container, as this interpreter runs them."""
    head = {"edgeprune": [sys.executable, "-m", "edgeprune"], "python": [sys.executable]}
    return [*head[argv[0]], *(_unescape(a) for a in argv[1:])]


def test_broker_health_check_runs_against_a_real_mosquitto(
    compose: dict[str, Any], mosquitto: MosquittoBroker
) -> None:
    check = [_unescape(a) for a in compose["services"]["broker"]["healthcheck"]["test"][1:]]
    check[check.index("-p") + 1] = str(mosquitto.port)  # the container's 1883, here
    check[check.index("-h") + 1] = mosquitto.host
    assert subprocess.run(check, capture_output=True, timeout=10).returncode == 0


@dataclass
class SmokeRun:
    """What running every service's command line once, locally, left behind."""

    pipe: str
    online: set[str]  # nodes whose status said online
    health: dict[str, int]  # node service -> exit code of its health check
    absent_health: int  # the health check for a node that never came online
    camera: subprocess.CompletedProcess[bytes]
    results: list[dict[str, Any]]
    exits: list[dict[str, Any]]
    exited_early: list[str]  # long-running services that had exited before the stop
    stop_codes: dict[str, int]  # after SIGTERM (what `docker stop` sends)
    controller_report: dict[str, Any] | None
    tails: str


LONG_RUNNING = ("node0", "node1", "controller")


@pytest.fixture(scope="module")
async def smoke_run(
    compose: dict[str, Any], mosquitto: MosquittoBroker, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[SmokeRun]:
    """Nodes and controller up, the camera's images through, then SIGTERM to all (25-40 s on
    two shared cores: two nodes build every pruning level)."""
    tmp_path = tmp_path_factory.mktemp("smoke")
    pipe = f"edgeprune-test-{uuid.uuid4().hex[:8]}"
    services = compose["services"]
    app = _app_dir(tmp_path)
    envs = {name: _local_env(services[name], mosquitto, pipe, app) for name in PYTHON_SERVICES}
    health = services["node0"]["healthcheck"]["test"]
    # The node health check fails for a node that never came online (runs meanwhile).
    absent = subprocess.Popen(
        _local_argv(health[1:]), cwd=app, env={**envs["node0"], "EDGEPRUNE_NODE_ID": "no-such-node"}
    )
    mqtt = MqttSettings(host=mosquitto.host, port=mosquitto.port)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    logs = {name: tmp_path / f"{name}.log" for name in PYTHON_SERVICES}
    try:
        async with collecting(mqtt, pipe) as col:
            for name in LONG_RUNNING:
                with logs[name].open("wb") as log:
                    procs[name] = subprocess.Popen(
                        _local_argv(services[name]["command"]),
                        cwd=app,
                        env=envs[name],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )

            def online() -> set[str]:
                return {s["node"] for s in col.statuses if s["state"] == "online"}

            await wait_until(
                lambda: (
                    {"n0", "n1"} <= online() or any(p.poll() is not None for p in procs.values())
                ),
                120,
                "nodes online",
            )
            if not {"n0", "n1"} <= online():
                pytest.fail(f"the nodes did not come online:\n{_tails(logs)}")
            checks = await asyncio.gather(
                *(
                    asyncio.to_thread(
                        subprocess.run,
                        _local_argv(health[1:]),
                        cwd=app,
                        env=envs[name],
                        capture_output=True,
                        timeout=30,
                    )
                    for name in ("node0", "node1")
                )
            )
            absent_code = await asyncio.to_thread(absent.wait, 30)

            camera = await asyncio.to_thread(
                subprocess.run,
                _local_argv(services["camera"]["command"]),
                cwd=app,
                env=envs["camera"],
                capture_output=True,
                timeout=120,
            )
            if camera.returncode == 0:
                await wait_until(
                    lambda: (
                        len(col.result_counts()) >= SMOKE_IMAGES
                        and len({e["request_id"] for e in col.exits}) >= SMOKE_IMAGES
                    ),
                    30,
                    f"{SMOKE_IMAGES} results and exits",
                )
            exited_early = [name for name, proc in procs.items() if proc.poll() is not None]
            codes = await asyncio.gather(
                *(asyncio.to_thread(stop_process, proc, 30) for proc in procs.values())
            )
            results, exits = list(col.results), list(col.exits)
        command = services["controller"]["command"]
        report_path = app / command[command.index("--report") + 1]  # in the runs volume
        yield SmokeRun(
            pipe=pipe,
            online=online(),
            health={
                name: run.returncode for name, run in zip(("node0", "node1"), checks, strict=True)
            },
            absent_health=absent_code,
            camera=camera,
            results=results,
            exits=exits,
            exited_early=exited_early,
            stop_codes=dict(zip(procs, codes, strict=True)),
            controller_report=(
                json.loads(report_path.read_text()) if report_path.exists() else None
            ),
            tails=_tails(logs),
        )
    finally:
        for proc in [*procs.values(), absent]:
            if proc.poll() is None:
                stop_process(proc, timeout=10)
        topics = Topics(pipe)
        await clear_retained(mqtt, pipe, [topics.status("n0"), topics.status("n1")])


@pytest.mark.slow
def test_every_service_runs_locally(smoke_run: SmokeRun) -> None:
    run = smoke_run
    assert {"n0", "n1"} <= run.online, run.tails
    assert run.health == {"node0": 0, "node1": 0}, run.tails  # the health checks say healthy
    assert run.absent_health == 1
    assert run.camera.returncode == 0, run.camera.stdout.decode() + run.camera.stderr.decode()
    assert len({r["request_id"] for r in run.results}) == SMOKE_IMAGES
    assert all(len(r["levels"]) == 2 for r in run.results)  # two stages
    assert len({e["request_id"] for e in run.exits}) == SMOKE_IMAGES
    assert not run.exited_early, f"{run.exited_early} exited early:\n{run.tails}"
    assert run.stop_codes == dict.fromkeys(LONG_RUNNING, 0), run.tails  # SIGTERM is clean


@pytest.mark.slow
def test_controller_joins_the_smoke_run(smoke_run: SmokeRun) -> None:
    """The compose file's controller, run with its compose environment, stays up for the
    whole run, watches this pipe, sees every request leave, and writes its report on
    SIGTERM into the runs volume."""
    run = smoke_run
    assert "controller" not in run.exited_early, run.tails
    assert run.stop_codes["controller"] == 0, run.tails
    report = run.controller_report
    assert report is not None, f"no controller report\n{run.tails}"
    assert report["kind"] == "controller-report" and report["pipe"] == run.pipe
    assert report["counts"]["exits"] >= SMOKE_IMAGES, report["counts"]
    assert report["latency"]["count"] >= SMOKE_IMAGES, report["latency"]
    assert len(report["final_levels"]) == 2  # the compose file's two stages


async def test_health_checks_work_against_the_secure_broker(
    compose: dict[str, Any], broker_factory: BrokerFactory, tmp_path: Path, topic_prefix: str
) -> None:
    """The same check, with the env a secure deployment gives (docs/deploy.md): TLS and a
    password; a node is healthy once its retained status says online."""
    setup = prepare_secure_broker(
        tmp_path / "secure", "node-n0,controller,observer", pipe=topic_prefix
    )
    broker = broker_factory(
        template=setup.config_template, run_dir=setup.run_dir, tls_context=setup.probe_context()
    )
    node = setup.settings("node-n0", broker.host, broker.port)
    async with aiomqtt.Client(**node.aiomqtt_kwargs()) as client:
        await client.publish(
            Topics(topic_prefix).status("n0"),
            good_json("status", node="n0", state="online"),
            qos=1,
            retain=True,
        )
    check = _local_argv(compose["services"]["node0"]["healthcheck"]["test"][1:])
    base = {k: v for k, v in os.environ.items() if not k.startswith("EDGEPRUNE_")}
    base["EDGEPRUNE_MQTT_PIPE"] = topic_prefix
    cases = {
        "node online": (
            {**setup.env("node-n0", broker.host, broker.port), "EDGEPRUNE_NODE_ID": "n0"},
            0,
        ),
        "controller logs in": (setup.env("controller", broker.host, broker.port), 0),
        "wrong password": (
            {
                **setup.env("controller", broker.host, broker.port),
                "EDGEPRUNE_MQTT_PASSWORD": "wrong",
            },
            1,
        ),
    }
    runs = await asyncio.gather(
        *(
            asyncio.to_thread(
                subprocess.run, check, env={**base, **env}, capture_output=True, timeout=30
            )
            for env, _ in cases.values()
        )
    )
    for (what, (_, expected)), run in zip(cases.items(), runs, strict=True):
        assert run.returncode == expected, (what, run.stderr.decode())


def test_secure_override_in_the_docs_is_valid(tmp_path: Path) -> None:
    """docs/deploy.md's docker-compose.secure.yml, over a run directory made the documented
    way, gives every service its own credentials, the CA, and the broker service name."""
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose is not installed")
    docs = (REPO / "docs" / "deploy.md").read_text()
    block = docs.split("<!-- compose-secure-override", 1)[1].split("```yaml\n", 1)[1]
    project = tmp_path / "project"
    setup = prepare_secure_broker(project / "runs" / "secure-broker")
    setup.write_env_files("127.0.0.1", 8883)  # what `--print-config` writes
    override = project / "docker-compose.secure.yml"
    override.write_text(block.split("```", 1)[0])
    proc = subprocess.run(
        [
            "docker-compose",
            "--project-directory",
            str(project),
            "-f",
            str(COMPOSE_FILE),
            "-f",
            str(override),
            "config",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PWD": str(project), "EDGEPRUNE_UID": "4242"},
    )
    assert proc.returncode == 0, proc.stderr
    services = _parse_yaml(proc.stdout)["services"]
    ca = str(setup.ca_cert)
    broker = services["broker"]
    assert broker["user"] == "4242"
    assert broker["command"] == ["mosquitto", "-c", str(setup.config_template)]
    assert f"{setup.run_dir}:{setup.run_dir}:ro" in broker["volumes"]
    assert broker["environment"]["EDGEPRUNE_MQTT_USERNAME"] == "observer"
    users = {
        "controller": "controller",
        "node0": "node-n0",
        "node1": "node-n1",
        "camera": "camera-cam0",
    }
    for name, user in users.items():
        env = services[name]["environment"]
        assert env["EDGEPRUNE_MQTT_USERNAME"] == user, name
        assert env["EDGEPRUNE_MQTT_PASSWORD"] == setup.passwords[user], name
        assert (env["EDGEPRUNE_MQTT_HOST"], env["EDGEPRUNE_MQTT_PORT"]) == ("broker", "8883")
        assert env["EDGEPRUNE_MQTT_TLS_CA"] == ca
        assert f"{ca}:{ca}:ro" in services[name]["volumes"], name
    assert services["node0"]["environment"]["EDGEPRUNE_NODE_ID"] == "n0"


@pytest.mark.parametrize("name", PYTHON_SERVICES)
def test_command_lines_parse_with_the_real_cli(compose: dict[str, Any], name: str) -> None:
    """Every subcommand and flag in the compose file exists in the CLI."""
    from edgeprune.cli import build_parser

    command = compose["services"][name]["command"]
    args = build_parser().parse_args(command[1:])
    assert args.command == command[1] and callable(args.func)


def _tails(logs: dict[str, Path]) -> str:
    out = []
    for name, path in logs.items():
        if path.exists():
            lines = path.read_text(errors="replace").splitlines()[-15:]
            out.append(f"--- {name} ---\n" + "\n".join(lines))
    return "\n".join(out)
