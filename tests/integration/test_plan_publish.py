"""`edgeprune plan --verify --publish` on a real Mosquitto: a plan whose accuracy measured on
the test split is below the floor is an error and nothing is retained on control/plan or the
stage levels; the same command on the real test split publishes the plan retained.

The failing case uses a copy of the data set whose TEST images are blank (the split depends on
the labels only, so train/validation/test stay the same images): the measured veto, on the
validation split, accepts the plan, and the verification on the test split must refuse it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiomqtt
import numpy as np
import pytest

from bus.connection import MqttSettings
from bus.plan_message import PlanMessage
from bus.topics import Topics
from edgeprune.cli import main
from pipeline.checkpoint import DEFAULT_CHECKPOINT
from pipeline.data import ArrayDataset, load_animal_mnist, split_dataset
from tests.helpers import DATA_DIR, REPO, clear_retained, stand_in_measurements

FLOOR = "0.5"  # the default model measures ~0.99; blank images give one class (~0.1)
MARKER = b"marker"


@pytest.fixture(scope="module")
def measurements(checkpoint, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return stand_in_measurements(checkpoint).save(
        tmp_path_factory.mktemp("plan") / "measurements.json"
    )


@pytest.fixture(scope="module")
def blank_test_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir whose test-split images are all zero (labels untouched)."""
    ds = load_animal_mnist(DATA_DIR, fetch=False)
    n = len(ds)
    # which rows are test: split a data set that carries each row's index in its pixels
    tagged = ArrayDataset(
        np.stack([np.arange(n) % 256, np.arange(n) // 256], axis=1)
        .astype(np.uint8)
        .reshape(n, 1, 2),
        ds.labels,
        ds.class_names,
    )
    test = split_dataset(tagged).test.images.reshape(-1, 2).astype(np.int64)
    rows = test[:, 0] + 256 * test[:, 1]
    images = ds.images.copy()
    images[rows] = 0
    out = tmp_path_factory.mktemp("blank-test")
    np.savez(out / "animal_mnist.npz", images=images, labels=ds.labels)
    return out


def _plan(mqtt: MqttSettings, pipe: str, measurements: Path, data: Path, *extra: str) -> int:
    return main(
        [
            "--log-level",
            "WARNING",
            "plan",
            "--devices",
            str(REPO / "devices" / "local.toml"),
            "--checkpoint",
            str(DEFAULT_CHECKPOINT),
            "--measurements",
            str(measurements),
            "--data-dir",
            str(data),
            "--floor",
            FLOOR,
            "--verify",
            "--publish",
            "--host",
            mqtt.host,
            "--port",
            str(mqtt.port),
            "--pipe",
            pipe,
            *extra,
        ]
    )


async def _retained_control(mqtt: MqttSettings, topics: Topics) -> list[aiomqtt.Message]:
    """Every retained message under control/ (plan and stage levels). The broker queues
    retained messages right after the SUBACK, so they arrive before our own marker."""
    async with aiomqtt.Client(**mqtt.aiomqtt_kwargs()) as client:
        await client.subscribe(f"{topics.plan.rsplit('/', 1)[0]}/#", qos=1)
        await client.publish(topics.plan, MARKER, qos=1)
        seen: list[aiomqtt.Message] = []
        async with asyncio.timeout(10):
            async for msg in client.messages:
                if msg.payload == MARKER and not msg.retain:
                    return seen
                seen.append(msg)
    return seen


@pytest.mark.timeout(600)
def test_a_plan_that_fails_verification_is_not_published(
    mqtt, topic_prefix, measurements, blank_test_data, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)  # the measured-accuracy caches go to runs/ here
    assert _plan(mqtt, topic_prefix, measurements, blank_test_data) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("edgeprune plan: error:")
    assert "on the test split, below the floor 0.5000" in err and "not published" in err
    assert asyncio.run(_retained_control(mqtt, Topics(topic_prefix))) == []


@pytest.mark.timeout(600)
def test_a_plan_that_passes_verification_is_published_retained(
    mqtt, topic_prefix, measurements, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    topics = Topics(topic_prefix)
    try:
        assert _plan(mqtt, topic_prefix, measurements, DATA_DIR) == 0
        assert "published plan v1" in capsys.readouterr().out
        retained = asyncio.run(_retained_control(mqtt, topics))
        plans = [m for m in retained if str(m.topic) == topics.plan]
        assert len(plans) == 1 and plans[0].retain
        assert isinstance(plans[0].payload, bytes)
        plan = PlanMessage.from_json(plans[0].payload)
        assert plan.version == 1
        assert {str(m.topic) for m in retained} == {
            topics.plan,
            *(topics.control_stage(i) for i in range(len(plan.placement.stages))),
        }
    finally:
        asyncio.run(
            clear_retained(
                mqtt, topic_prefix, [topics.plan, *(topics.control_stage(i) for i in range(5))]
            )
        )
