"""Policies by name: ``static:<level>`` (``static`` = ``static:0``), reactive, proactive, oracle;
accepted by the controller's config and command line, and by ``edgeprune experiment``."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from controller.config import ControllerConfig, PolicySpec, parse_policy
from controller.core import ControllerState
from controller.policy import ActionKind
from edgeprune.commands import controller as controller_cmd
from edgeprune.commands import experiment as experiment_cmd
from experiment.config import config_from_mapping
from pipeline.errors import ConfigError
from tests.unit.test_controller_service import Sim, calibration, config, level_message


def test_static_levels_parse_and_static_is_static_zero() -> None:
    assert parse_policy("static") == parse_policy("static:0") == PolicySpec("static", 0)
    assert parse_policy("static:5") == PolicySpec("static", 5)
    assert parse_policy(" static:12 ").name == "static:12"
    assert parse_policy("static").name == "static:0"
    for kind in ("reactive", "proactive", "oracle"):
        assert parse_policy(kind) == PolicySpec(kind)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("static:", "non-negative integer"),
        ("static:-1", "non-negative integer"),
        ("static:x", "non-negative integer"),
        ("static:1.5", "non-negative integer"),
        ("static5", "static:<level>"),
        ("oracle:1", "static:<level>"),
        ("psychic", "static:<level>"),
        ("", "static:<level>"),
    ],
)
def test_bad_policy_names_are_clear_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_policy(text)


def test_a_static_level_the_model_does_not_have_is_refused() -> None:
    parse_policy("static:5").check_levels(6)
    with pytest.raises(ConfigError, match=r"level 6 does not exist; the levels are 0\.\.5"):
        parse_policy("static:6").check_levels(6)
    cfg = config(policy="static:6")  # valid as a name: the calibration knows the levels
    with pytest.raises(ConfigError, match="level 6 does not exist"):
        ControllerState(cfg, calibration(), now=0.0)
    with pytest.raises(ConfigError):
        ControllerConfig(slo_ms=100.0, policy="static:x")


def test_static_level_holds_every_stage_from_the_first_decision_and_only_once() -> None:
    s = Sim(ControllerState(config(policy="static:5"), calibration(), now=0.0))
    decisions = s.run(4.0, latency=0.01)
    assert len(decisions) == 1
    d = decisions[0]
    assert d.levels == (5, 5) and d.kind is ActionKind.PRUNE and d.plan.how == "static"
    assert d.policy == "static:5" and d.at <= 0.2 + 1e-9
    assert s.state.levels == (5, 5)
    # someone else lowers stage 1: the static level is set again
    s.state.on_level(s.t, 1, level_message(1, 2, seq=999))
    again = s.run(1.0, latency=0.01)
    assert [x.levels for x in again] == [(5, 5)]


def test_static_zero_only_observes() -> None:
    s = Sim(ControllerState(config(policy="static:0"), calibration(), now=0.0))
    s.state.on_level(0.0, 1, level_message(1, 3, seq=7))
    assert s.run(3.0, latency=0.5, slow=(1.0, 3.0)) == []
    assert s.state.levels == (0, 3)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    controller_cmd.register(sub)
    experiment_cmd.register(sub)
    return parser


def test_controller_command_line_accepts_static_levels_and_refuses_bad_ones() -> None:
    parser = _parser()
    base = ["controller", "--calibration", "x.json", "--slo-ms", "100"]
    args = parser.parse_args([*base, "--policy", "static:5"])
    assert controller_cmd.build_config(args).policy_spec == PolicySpec("static", 5)
    args = parser.parse_args([*base, "--policy", "static:five"])
    with pytest.raises(ConfigError, match="non-negative integer"):
        controller_cmd.build_config(args)


def _experiment(policy: str = "reactive", **model: Any) -> Any:
    return config_from_mapping(
        {
            "experiment": {"name": "t", "policy": policy},
            "model": model,
            "plan": {"cuts": [3], "nodes": ["a", "b"]},
            "trace": {"names": ["orinoquia_day1"]},
            "controller": {"slo_ms": 150},
        }
    )


def test_compare_takes_static_levels_and_the_oracle() -> None:
    parser = _parser()
    args = parser.parse_args(
        ["experiment", "x.toml", "--compare", "static:0,static:5,reactive,proactive,oracle"]
    )
    assert experiment_cmd.policies_of(args, "reactive") == [
        "static:0",
        "static:5",
        "reactive",
        "proactive",
        "oracle",
    ]
    for bad, message in (
        ("static,static:0", "distinct"),
        ("static:0,static:zero", "non-negative integer"),
        ("reactive,psychic", "psychic"),
    ):
        args = parser.parse_args(["experiment", "x.toml", "--compare", bad])
        with pytest.raises(ConfigError, match=message):
            experiment_cmd.policies_of(args, "reactive")
    args = parser.parse_args(["experiment", "x.toml", "--policy", "static:3"])
    assert experiment_cmd.policies_of(args, "reactive") == ["static:3"]


def test_the_scenario_policy_key_takes_static_levels_within_its_levels() -> None:
    assert _experiment("static:5").policy == "static:5"
    assert _experiment("oracle").check_policy("oracle") == PolicySpec("oracle")
    with pytest.raises(ConfigError, match="level 6 does not exist"):
        _experiment("static:6")
    with pytest.raises(ConfigError, match=r"level 3 does not exist; the levels are 0\.\.2"):
        _experiment("static:3", ratios=[0.0, 0.2, 0.4])
    with pytest.raises(ConfigError, match="non-negative integer"):
        _experiment("static:-2")


def test_the_demo_runs_the_honest_comparison_by_default() -> None:
    from edgeprune.commands import demo

    assert demo.honest_compare(6) == "static:0,static:5,reactive,proactive,oracle"
    parser = argparse.ArgumentParser()
    demo.register(parser.add_subparsers())
    args = parser.parse_args(["demo"])
    args.compare = demo.honest_compare(_experiment().n_levels)
    assert experiment_cmd.policies_of(args, "reactive")[:2] == ["static:0", "static:5"]
