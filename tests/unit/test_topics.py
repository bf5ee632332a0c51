"""bus/topics.py is the only place a topic string is made: the filters and ACL patterns built
from it, the multi-view topics, and the device script that keeps its own copy."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bus.topics import ROOT, AclTopics, Topics, ViewTopics
from nodes import pi_camera
from pipeline.errors import ConfigError

T = Topics("farm")
NAME = st.from_regex(r"[A-Za-z0-9_.\-]{1,64}", fullmatch=True)


def test_wildcard_filters_of_a_pipe() -> None:
    assert T.stage_all == "edgeprune/farm/stage/+"
    assert T.control_all == "edgeprune/farm/control/#"
    assert T.node_all("n0") == "edgeprune/farm/nodes/n0/#"
    with pytest.raises(ConfigError):
        T.node_all("n0/#")


def test_a_relative_filter_is_joined_to_the_pipe_an_absolute_one_kept() -> None:
    assert T.absolute_filter("stage/#") == "edgeprune/farm/stage/#"
    assert T.absolute_filter("/nodes/+/metrics") == "edgeprune/farm/nodes/+/metrics"
    assert T.absolute_filter("edgeprune/other/errors") == "edgeprune/other/errors"
    assert T.absolute_filter("edgeprune") == "edgeprune"
    assert T.absolute_filter("edgeprunex/y") == "edgeprune/farm/edgeprunex/y"


def test_acl_patterns_of_one_pipe_or_every_pipe() -> None:
    assert AclTopics("farm").camera_stage("north") == T.camera_stage("north")
    assert AclTopics("farm").everything == T.everything == "edgeprune/farm/#"
    every = AclTopics("+")
    assert every.everything == "edgeprune/#"
    assert every.control_stage(1) == "edgeprune/+/control/stage/1"
    assert every.node_errors("n0") == "edgeprune/+/errors/n0"
    with pytest.raises(ConfigError):
        Topics("+")  # only an ACL pattern may stand for every pipe
    with pytest.raises(ConfigError):
        AclTopics("a/b")


def test_multi_view_topics() -> None:
    v = ViewTopics("farm")
    assert v.view(2) == "edgeprune/farm/view/2"
    assert v.features(2) == "edgeprune/farm/fusion/2"
    assert v.features_all == "edgeprune/farm/fusion/+"
    assert v.control(2) == "edgeprune/farm/control/view/2"
    assert v.base == T


@given(pipe=NAME, camera=NAME)
def test_the_pi_camera_script_publishes_where_the_stage_zero_node_listens(
    pipe: str, camera: str
) -> None:
    """nodes/pi_camera.py is copied to a device alone and keeps its own topic code: the names
    its parse_args accepts must give the topic bus.topics gives."""
    assert pi_camera.TOPIC_ROOT == ROOT
    assert pi_camera.PIPE_NAME.fullmatch(pipe) and pi_camera.PIPE_NAME.fullmatch(camera)
    assert pi_camera.stage0_topic(pipe, camera) == Topics(pipe).camera_stage(camera)


def test_the_pi_camera_script_accepts_exactly_the_names_topics_accept() -> None:
    for name in ("trap-3", "a.b_c", "x" * 64):
        args = pi_camera.parse_args(["--pipe", name, "--camera-id", name])
        assert pi_camera.stage0_topic(args.pipe, args.camera_id) == Topics(name).camera_stage(name)
    for bad in ("a/b", "a+b", "x" * 65, "a b"):
        with pytest.raises(ConfigError):
            Topics(bad)
        with pytest.raises(SystemExit):
            pi_camera.parse_args(["--pipe", bad])
