"""Fixtures of the integration tests: the trained default checkpoint and its test images."""

from __future__ import annotations

import pytest

from bus.connection import MqttSettings
from nodes.camera import ImageSource, load_source
from pipeline.checkpoint import DEFAULT_CHECKPOINT, Checkpoint, load_checkpoint
from tests.helpers import DATA_DIR


@pytest.fixture(scope="session")
def checkpoint() -> Checkpoint:
    return load_checkpoint(DEFAULT_CHECKPOINT)


@pytest.fixture(scope="session")
def test_images() -> ImageSource:
    return load_source("animal-mnist", DATA_DIR, "test")


@pytest.fixture
def mqtt(mosquitto) -> MqttSettings:
    return MqttSettings(host=mosquitto.host, port=mosquitto.port)
