"""Who a writer is: the identity levels in the topics (stage/0/<camera>, errors/<node>) and how
`edgeprune node` and `edgeprune camera` agree with the secure broker's user names."""

from __future__ import annotations

import pytest

from broker.security import camera_id_for, node_id_for
from bus.topics import Topics, camera_level
from edgeprune.cli import build_parser
from edgeprune.commands.node import build_config
from pipeline.errors import ConfigError

T = Topics("farm")


def test_stage_zero_topics_carry_the_camera() -> None:
    assert T.camera_stage("trap-3") == "edgeprune/farm/stage/0/trap-3"
    assert T.stage_input(0) == T.camera_stage_all == "edgeprune/farm/stage/0/+"
    assert T.stage_input(2) == T.stage(2) == "edgeprune/farm/stage/2"
    assert T.camera_of(T.camera_stage("trap-3")) == "trap-3"
    assert T.camera_of(T.stage(0)) is None and T.camera_of(T.stage(1)) is None
    assert T.camera_of("edgeprune/other/stage/0/trap-3") is None
    assert T.stage_of(T.camera_stage("trap-3")) == 0 and T.stage_of(T.stage(2)) == 2
    assert T.stage_of(T.control_stage(1)) == 1


def test_a_trace_camera_id_becomes_one_topic_level() -> None:
    assert camera_level("raspberry-pi-2@-0.3886,36.9614") == "raspberry-pi-2_-0.3886_36.9614"
    assert camera_level("a/b+c#d") == "a_b_c_d"
    assert len(camera_level("x" * 128)) == 64
    with pytest.raises(ConfigError):
        camera_level("")


def test_node_errors_are_under_the_node() -> None:
    assert T.node_errors("n1") == "edgeprune/farm/errors/n1"
    assert T.errors_all == "edgeprune/farm/errors/#"
    with pytest.raises(ConfigError):
        T.node_errors("n1/x")


def test_a_node_runs_as_its_users_node() -> None:
    assert node_id_for("node-n0", None) == "n0"
    assert node_id_for("node-n0", "n0") == "n0"
    assert node_id_for(None, "n3") == node_id_for("alice", "n3") == "n3"  # not our naming
    with pytest.raises(ConfigError, match="log in as node-n0"):
        node_id_for("node-n1", "n0")
    with pytest.raises(ConfigError, match="log in as node-n0"):
        node_id_for("observer", "n0")  # could not publish anything
    with pytest.raises(ConfigError, match="--node-id is required"):
        node_id_for(None, None)


def test_a_camera_publishes_as_its_users_camera() -> None:
    assert camera_id_for("camera-north", None) == "north"
    assert camera_id_for("camera-north", "north") == "north"
    assert camera_id_for(None, None) is None  # the schedule's own camera ids
    assert camera_id_for("alice", "east") == "east"
    with pytest.raises(ConfigError, match="only as camera 'north'"):
        camera_id_for("camera-north", "south")
    with pytest.raises(ConfigError, match="camera-<id>"):
        camera_id_for("node-n0", None)


def test_node_cli_takes_its_id_from_the_user(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEPRUNE_MQTT_USERNAME", "node-n1")
    parser = build_parser()
    assert build_config(parser.parse_args(["node"])).node_id == "n1"
    with pytest.raises(ConfigError, match="may not publish as node 'n0'"):
        build_config(parser.parse_args(["node", "--node-id", "n0"]))


def test_pi_camera_publishes_as_its_users_camera(capsys: pytest.CaptureFixture[str]) -> None:
    from nodes import pi_camera

    assert pi_camera.parse_args(["--username", "camera-trap3"]).camera_id == "trap3"
    assert pi_camera.parse_args(["--camera-id", "trap9"]).camera_id == "trap9"
    assert pi_camera.parse_args([]).camera_id == "picam"
    with pytest.raises(SystemExit):
        pi_camera.parse_args(["--username", "camera-trap3", "--camera-id", "trap4"])
    assert "may publish only as camera 'trap3'" in capsys.readouterr().err
