"""Goals of the benchmarks: checking a measured figure against its target, overriding targets,
what each bench reports as its goals, and `edgeprune bench ... --check` exit codes (with the
controller bench on a tiny configuration: it runs in about a second)."""

from __future__ import annotations

import argparse
import json
import math

import pytest

from bench import controller, hop, planner, prune
from bench.goals import (
    Goal,
    GoalSpec,
    check_overrides,
    goals_json,
    missed,
    missed_message,
    parse_goal_override,
    render_goals,
    with_targets,
)
from edgeprune.cli import build_parser, main
from edgeprune.commands.bench import BENCHES
from pipeline.errors import ConfigError

TINY_CONTROLLER = ["--runs", "20", "--brute-runs", "2", "--instances", "2"]


@pytest.mark.parametrize(
    ("measured", "comparison", "target", "met"),
    [
        (0.5, "<=", 1.0, True),
        (1.0, "<=", 1.0, True),
        (1.5, "<=", 1.0, False),
        (0.96, ">=", 0.95, True),
        (0.95, ">=", 0.95, True),
        (0.94, ">=", 0.95, False),
        (None, ">=", 0.95, False),
        (math.nan, "<=", 1.0, False),
        (math.inf, ">=", 0.95, False),
    ],
)
def test_a_goal_is_met_only_by_a_finite_measurement_on_the_right_side(
    measured: float | None, comparison: str, target: float, met: bool
) -> None:
    goal = GoalSpec("figure", comparison, target).measured(measured)  # type: ignore[arg-type]
    assert goal.met is met
    assert missed([goal]) == (() if met else (goal,))


def test_a_goal_refuses_a_bad_comparison_or_target() -> None:
    with pytest.raises(ConfigError):
        Goal("x", 1.0, "<", 1.0)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        Goal("x", 1.0, "<=", math.nan)


def test_overrides_replace_targets_and_unknown_figures_are_refused() -> None:
    specs = (GoalSpec("a_ms", "<=", 1.0), GoalSpec("b_fraction", ">=", 0.9))
    goals = (specs[0].measured(0.5), specs[1].measured(0.95))
    assert not missed(goals)
    tightened = with_targets(goals, {"a_ms": 0.1})
    assert [g.figure for g in missed(tightened)] == ["a_ms"]
    assert tightened[1] == goals[1]
    check_overrides(specs, {"a_ms": 0.1}, "demo")
    with pytest.raises(ConfigError, match=r"no goal c_ms .*a_ms, b_fraction"):
        check_overrides(specs, {"c_ms": 1.0}, "demo")


@pytest.mark.parametrize("text", ["a", "=1", "a=", "a=x", "a=nan", "a=inf"])
def test_a_malformed_goal_override_is_an_argument_error(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_goal_override(text)


def test_a_goal_override_parses() -> None:
    assert parse_goal_override(" decision_ms_8_slices = 0.5") == ("decision_ms_8_slices", 0.5)


def test_the_printed_goals_and_the_json_name_every_missed_figure() -> None:
    goals = (
        GoalSpec("hop_p50_ms_200KB", "<=", 1.0).measured(1.2),
        GoalSpec("throughput_fraction_of_bound", ">=", 0.9).measured(0.95),
        GoalSpec("never", ">=", 1.0).measured(None),
    )
    text = render_goals(goals)
    assert "hop_p50_ms_200KB = 1.2 (goal <= 1): NOT met" in text
    assert "throughput_fraction_of_bound = 0.95 (goal >= 0.9): met" in text
    assert "never = - (goal >= 1): not measured" in text
    data = goals_json(goals)
    assert data["goals_missed"] == ["hop_p50_ms_200KB", "never"]
    assert [g["met"] for g in data["goal_results"]] == [False, True, False]
    message = missed_message("hop", missed(goals))
    assert "hop_p50_ms_200KB" in message and "never" in message
    assert "throughput_fraction_of_bound" not in message
    assert "none" in render_goals(())


def test_each_bench_reports_the_goals_it_prints() -> None:
    """The figures come from the bench's own report keys, so a missed one is named."""
    report = {"speedup_over_mac_at_0.3": 0.77, "switch_ms": 0.0001}
    assert [g.figure for g in missed(prune.goals(report))] == ["speedup_over_mac_at_0.3"]
    r = {"hop_p50_ms_200KB": 0.9, "throughput_fraction_of_bound": 0.7}
    assert [g.figure for g in missed(hop.goals(r))] == ["throughput_fraction_of_bound"]
    skipped = {"hop_p50_ms_200KB": 0.9, "throughput_fraction_of_bound": None}
    assert [g.figure for g in hop.goals(skipped, throughput=False)] == ["hop_p50_ms_200KB"]
    out = {"bounds_met_fraction_measured": 0.93, "median_speedup_vs_uniform": 1.0}
    assert [g.figure for g in missed(planner.goals(out))] == ["bounds_met_fraction_measured"]
    assert [s.figure for s in controller.GOALS] == ["decision_ms_8_slices"]


def test_every_bench_takes_check_and_goal() -> None:
    parser = build_parser()
    for name in BENCHES:
        args = parser.parse_args(["bench", name, "--check", "--goal", "x=1"])
        assert args.check is True and args.goal == [("x", 1.0)]
        assert parser.parse_args(["bench", name]).check is False


def test_bench_check_exits_1_naming_the_missed_figure(capsys: pytest.CaptureFixture[str]) -> None:
    impossible = ["--goal", "decision_ms_8_slices=0"]
    argv = ["--log-level", "WARNING", "bench", "controller", *TINY_CONTROLLER, *impossible]
    assert main([*argv, "--check"]) == 1
    captured = capsys.readouterr()
    assert "goal missed: decision_ms_8_slices" in captured.err
    assert "decision_ms_8_slices" in captured.out and "NOT met" in captured.out
    assert main(argv) == 0  # without --check a miss is reported, not an error
    assert "NOT met" in capsys.readouterr().out


def test_bench_check_exits_0_when_the_goals_are_met(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--log-level", "WARNING", "bench", "controller", *TINY_CONTROLLER, "--json"]
    assert main([*argv, "--check", "--goal", "decision_ms_8_slices=1000"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["goals_missed"] == []
    assert out["goal_results"][0]["figure"] == "decision_ms_8_slices"
    assert out["goal_results"][0]["measured"] == out["decision_ms_8_slices"]


def test_a_goal_the_bench_lacks_is_a_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--log-level", "WARNING", "bench", "controller", *TINY_CONTROLLER]
    assert main([*argv, "--goal", "switch_ms=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("edgeprune bench: error:") and "decision_ms_8_slices" in err
