"""The oracle policy on a known schedule, without a network: the levels it sets when each
slowdown window starts and ends are the optimizer's for the known factor and arrival rate."""

from __future__ import annotations

from pathlib import Path

import pytest

from controller.core import ControllerState
from controller.optimizer import solve_bottleneck
from controller.oracle import OraclePolicy, OracleSchedule, OracleSegment
from controller.policy import ActionKind
from experiment.config import config_from_mapping
from experiment.oracle import oracle_schedule, peak_rate
from pipeline.errors import ConfigError
from tests.unit.test_controller_service import RATIOS, calibration, config

T0 = 1000.0  # epoch seconds of the experiment clock's 0


def schedule() -> OracleSchedule:
    """Stage 1 slowed down 3x during [10, 20) s at 50 requests/s; 50/s throughout."""
    return OracleSchedule(
        T0,
        (
            OracleSegment(0.0, (1.0, 1.0), 50.0),
            OracleSegment(10.0, (1.0, 3.0), 50.0),
            OracleSegment(20.0, (1.0, 1.0), 50.0),
        ),
    )


def oracle_state(**overrides: object) -> ControllerState:
    return ControllerState(
        config(policy="oracle", **overrides), calibration(), now=0.0, oracle_schedule=schedule()
    )


def levels_over_time(state: ControllerState, until: float, step: float = 0.2) -> list[tuple]:
    """(clock time, kind, levels) of every decision on ticks of ``step`` seconds; the nodes
    are assumed to apply the levels at once (the state already holds them)."""
    out = []
    t = -5.0
    while t < until:
        d = state.decide(t + 5.0, wall=T0 + t)
        if d is not None:
            out.append((round(t, 6), d.kind, d.levels))
        t += step
    return out


def test_the_oracle_prunes_when_the_window_starts_and_restores_when_it_ends() -> None:
    state = oracle_state()
    decisions = levels_over_time(state, 30.0)
    assert len(decisions) == 2
    (t_prune, kind_prune, pruned), (t_restore, kind_restore, restored) = decisions
    assert kind_prune is ActionKind.PRUNE and 10.0 <= t_prune < 10.2
    assert kind_restore is ActionKind.RESTORE and 20.0 <= t_restore < 20.2
    assert pruned[0] == 0 and pruned[1] > 0  # only the slowed stage
    assert restored == (0, 0)


def test_the_oracle_levels_are_the_optimizers_for_the_known_factor() -> None:
    state = oracle_state()
    cal, cfg = state.calibration, state.config
    assert state.oracle is not None
    for segment, plan in zip(state.oracle.schedule.segments, state.oracle.plans, strict=True):
        expected = solve_bottleneck(
            [s.fit for s in cal.slices],
            cal.accuracy_fit,
            cfg.a_min,
            ratios=RATIOS,
            slowdowns=segment.slowdowns,
            target_s=cfg.rho_target / (segment.rate or 1.0),
        )
        assert plan.levels == expected.levels
        assert plan.target_s == pytest.approx(cfg.rho_target / 50.0)
    # the same planner inputs as the live policies: a lower rho_target prunes more
    mild = OracleSchedule(T0, (OracleSegment(0.0, (1.0, 1.5), 50.0),))
    loose = OraclePolicy(mild, oracle_state().plan_inputs(0.0))  # 15 ms <= 0.75 / 50 s
    tight = OraclePolicy(mild, oracle_state(rho_target=0.5, rho_low=0.3).plan_inputs(0.0))
    assert loose.plans[0].levels == (0, 0)
    assert tight.plans[0].levels[0] == 0 and tight.plans[0].levels[1] > 0


def test_the_first_segment_is_set_before_the_clock_starts_and_idle_means_level_zero() -> None:
    busy_from_start = OracleSchedule(
        T0, (OracleSegment(0.0, (1.0, 3.0), 50.0), OracleSegment(5.0, (1.0, 1.0), 0.0))
    )
    state = ControllerState(
        config(policy="oracle"), calibration(), now=0.0, oracle_schedule=busy_from_start
    )
    d = state.decide(0.0, wall=T0 - 30.0)  # long before the trace starts
    assert d is not None and d.levels[1] > 0 and d.plan.how == "oracle"
    assert "oracle" in d.action.reason and d.policy == "oracle"
    assert state.decide(0.2, wall=T0 - 29.8) is None  # once per segment
    d = state.decide(40.0, wall=T0 + 6.0)
    assert d is not None and d.levels == (0, 0)  # no arrivals: nothing to serve
    assert state.decide(40.2, wall=T0 + 6.2) is None
    assert oracle_state().decide(1.0, wall=None) is None  # no wall clock: nothing to follow


def test_the_oracle_needs_its_schedule_and_a_matching_one() -> None:
    with pytest.raises(ConfigError, match="oracle-schedule"):
        ControllerState(config(policy="oracle"), calibration(), now=0.0)
    three = OracleSchedule(T0, (OracleSegment(0.0, (1.0, 1.0, 1.0), 5.0),))
    with pytest.raises(ConfigError, match="3 stages"):
        ControllerState(config(policy="oracle"), calibration(), now=0.0, oracle_schedule=three)
    with pytest.raises(ConfigError, match="increasing"):
        OracleSchedule(T0, (OracleSegment(5.0, (1.0,), 1.0), OracleSegment(1.0, (1.0,), 1.0)))
    with pytest.raises(ConfigError, match="positive"):
        OracleSegment(0.0, (0.0,), 1.0)


def test_schedule_file_round_trip(tmp_path: Path) -> None:
    path = schedule().save(tmp_path / "oracle.json")
    assert OracleSchedule.load(path) == schedule()
    (tmp_path / "bad.json").write_text('{"clock_start": 1}')
    with pytest.raises(ConfigError, match="bad oracle schedule"):
        OracleSchedule.load(tmp_path / "bad.json")


def test_peak_rate_is_the_busiest_window_within_the_segment() -> None:
    sends = [0.0, 0.1, 0.2, 0.3, 5.0, 9.0, 9.5]
    assert peak_rate(sends, 0.0, 10.0, 1.0) == pytest.approx(4.0)
    assert peak_rate(sends, 4.0, 10.0, 2.0) == pytest.approx(1.0)
    assert peak_rate(sends, 0.0, 0.5, 5.0) == pytest.approx(8.0)  # segment shorter: its length
    assert peak_rate(sends, 20.0, 30.0, 1.0) == 0.0


def test_the_experiment_schedule_follows_the_emulated_windows() -> None:
    exp = config_from_mapping(
        {
            "experiment": {"name": "t"},
            "plan": {"cuts": [3], "nodes": ["a", "b"]},
            "trace": {"names": ["orinoquia_day1"]},
            "emulation": {"a": {"factor": 2}, "b": {"factor": 3, "windows": [[4, 14, 5]]}},
            "controller": {"slo_ms": 150, "rate_tau_s": 1.0},
        }
    )
    sends = [0.5 * k for k in range(60)]  # 2 per second for 30 s
    known = oracle_schedule(exp, sends, clock_start=T0)
    assert known.clock_start == T0
    assert [s.start_s for s in known.segments] == [0.0, 4.0, 14.0]
    assert [s.slowdowns for s in known.segments] == [(2.0, 3.0), (2.0, 15.0), (2.0, 3.0)]
    assert all(s.rate == pytest.approx(2.0) for s in known.segments)
    assert known.index_at(-3.0) == 0 and known.index_at(13.9) == 1 and known.index_at(99) == 2


def test_an_oracle_without_arrivals_keeps_full_accuracy() -> None:
    policy = OraclePolicy(
        OracleSchedule(T0, (OracleSegment(0.0, (1.0, 9.0), None),)),
        oracle_state().plan_inputs(0.0),
    )
    assert policy.plans[0].levels == (0, 0)
    assert policy.decide(0.0, T0, (0, 0)) is None


def test_the_machine_factor_is_measured_at_level_zero_outside_the_windows_first_seconds() -> None:
    mild = OracleSchedule(
        T0,
        (
            OracleSegment(0.0, (1.0, 1.0), 50.0),
            OracleSegment(10.0, (1.0, 1.5), 50.0),
            OracleSegment(20.0, (1.0, 1.0), 50.0),
        ),
    )
    policy = OraclePolicy(mild, oracle_state().plan_inputs(0.0), settle_s=2.0)
    assert policy.plans[1].levels == (0, 0)  # 15 ms meets 0.75 / 50 s: the known factor alone
    policy.observe(T0 + 5.0, (0, 3), (1.0, 9.0))  # stage 1 pruned: not a clean measurement
    assert policy.machine == [1.0, None]
    policy.observe(T0 + 5.2, (0, 0), (1.0, 1.4))  # the node is 1.4x slower than calibrated
    assert policy.machine == pytest.approx([1.0, 1.4])
    policy.observe(T0 + 11.0, (0, 0), (1.0, 1.4))  # 1 s into the window: the estimate lags
    assert policy.machine == pytest.approx([1.0, 1.4])
    assert policy.decide(0.0, T0 + 5.4, (0, 0)) is None  # segment 0 needs no change
    d = policy.decide(1.0, T0 + 10.1, (0, 0))  # 1.5 x 1.4 = 2.1: 21 ms > 15 ms
    assert d is not None and d[0].kind is ActionKind.PRUNE and d[1].levels[1] > 0
    assert "machine factors x1.00, x1.40" in d[0].reason
    d = policy.decide(2.0, T0 + 20.0, d[1].levels)
    assert d is not None and d[0].kind is ActionKind.RESTORE and d[1].levels == (0, 0)
