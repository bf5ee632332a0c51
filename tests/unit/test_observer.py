"""What the observer subscribes to and how it reads one message (no broker; the broker side is
tests/integration/test_observer.py)."""

from __future__ import annotations

import pytest

from bus.connection import MqttSettings
from bus.observer import KINDS, Observer, record_of, subscriptions_for
from bus.topics import Topics
from pipeline import codec
from pipeline.errors import CodecError, ConfigError

T = Topics("farm")


def test_each_kind_has_its_subscription_and_nothing_else_is_subscribed() -> None:
    every = subscriptions_for(T, KINDS)
    assert every == [
        (T.camera_stage_all, 1),
        (T.results, 1),
        (T.exits, 1),
        (T.control_all, 1),
        (T.status_all, 1),
        (T.metrics_all, 0),
        (T.errors_all, 1),
    ]
    assert all(T.stage(1) != topic for topic, _ in every)  # tensors past stage 0: never
    assert subscriptions_for(T, ("level", "decision")) == [(T.control_all, 1)]
    # the controller's status is under control/: its own filter unless control/# is taken
    assert subscriptions_for(T, ("result", "status")) == [
        (T.results, 1),
        (T.status_all, 1),
        (T.controller_status, 1),
    ]
    with pytest.raises(ConfigError, match="unknown message kinds"):
        subscriptions_for(T, ("result", "tensor"))
    with pytest.raises(ConfigError):
        Observer(MqttSettings(), [], lambda m: None)


def test_a_camera_message_is_read_as_a_send_and_a_level_keeps_its_topic() -> None:
    image = codec.StageMessage(
        "c-r-1", "c", 0, 10.0, 9.5, attempt=1, label=4, image=b"x", image_format="png"
    )
    kind, body = record_of(T, T.camera_stage("c"), codec.encode_stage(image))
    assert (kind, body) == (
        "send",
        {"request_id": "c-r-1", "camera": "c", "entry_ts": 10.0, "attempt": 1, "label": 4},
    )
    level = codec.encode_json("level", {"stage": 2, "level": 1, "ratio": 0.1})
    kind, body = record_of(T, T.control_stage(2), level)
    assert kind == "level" and body["topic"] == T.control_stage(2) and body["level"] == 1
    for topic, garbage in ((T.camera_stage("c"), b"\x00"), (T.results, b"[1]"), (T.exits, b"")):
        with pytest.raises(CodecError):
            record_of(T, topic, garbage)
