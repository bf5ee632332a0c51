"""Shared fixtures: one real Mosquitto for the whole session, per-test topic prefixes, and a
factory for throw-away brokers that a test may restart or kill.

Tests under ``tests/integration`` are marked ``integration`` automatically, so
``pytest -m "not integration"`` runs only the tests that need no broker.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.launcher import MosquittoBroker

INTEGRATION_DIR = Path(__file__).parent / "integration"

BrokerFactory = Callable[..., MosquittoBroker]
"""``broker_factory(**kwargs)``: start a MosquittoBroker (same arguments) owned by one test."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test collected from tests/integration as ``integration``."""
    for item in items:
        if item.path.is_relative_to(INTEGRATION_DIR):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """The CLI's main() configures the root logger; give pytest its handlers back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    """The session's shared broker on a free port, already answering MQTT.

    Never restart or stop it in a test (use ``broker_factory`` for that); isolate traffic with
    ``topic_prefix``. Its config and log stay in pytest's temporary directory for post-mortems.
    """
    broker = MosquittoBroker(port=None, run_dir=tmp_path_factory.mktemp("mosquitto"))
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def topic_prefix() -> str:
    """A pipe name unique to this test, e.g. ``edgeprune-test-1a2b3c4d``."""
    return f"edgeprune-test-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def broker_factory(tmp_path: Path) -> Iterator[BrokerFactory]:
    """Start extra brokers owned by one test; all of them are stopped when the test ends.

    Each gets its own run directory under the test's ``tmp_path`` unless ``run_dir`` is given.
    """
    started: list[MosquittoBroker] = []

    def start(**kwargs: Any) -> MosquittoBroker:
        kwargs.setdefault("run_dir", tmp_path / f"broker-{len(started)}")
        broker = MosquittoBroker(**kwargs)
        started.append(broker)
        broker.start()
        return broker

    try:
        yield start
    finally:
        for broker in reversed(started):
            broker.stop()
