"""Trigger policies on synthetic timelines: sustain, cooldown, restore, and spikes that do not
trigger."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.policy import (
    Action,
    ActionKind,
    ArrivalRate,
    LatencyWindow,
    ProactiveConfig,
    ProactivePolicy,
    ReactiveConfig,
    ReactivePolicy,
    predicted_latency,
)
from pipeline.errors import ConfigError

# 20 finished requests per second; the controller decides every 0.5 s.
SAMPLE_DT = 0.05
DECIDE_DT = 0.5


def _config(**overrides: float) -> ReactiveConfig:
    values = dict(
        slo_s=1.0,
        margin_s=0.2,
        window_s=2.0,
        sustain_s=5.0,
        cooldown_s=10.0,
        restore_sustain_s=30.0,
        min_samples=5,
    )
    values.update(overrides)
    return ReactiveConfig(**values)  # type: ignore[arg-type]


def _run(
    policy: ReactivePolicy,
    latency: Callable[[float], float | None],
    until: float,
    **decide_kwargs: bool,
) -> list[Action]:
    """Feed ``latency(t)`` (None: no request finished) and decide on a fixed cadence."""
    actions = []
    steps_per_decide = round(DECIDE_DT / SAMPLE_DT)
    for k in range(1, round(until / SAMPLE_DT) + 1):
        t = k * SAMPLE_DT
        value = latency(t)
        if value is not None:
            policy.observe(t, value)
        if k % steps_per_decide == 0:
            action = policy.decide(t, **decide_kwargs)
            if action is not None:
                actions.append(action)
    return actions


def test_window_quantile_matches_numpy_and_prunes_by_time() -> None:
    window = LatencyWindow(window_s=1.0)
    assert window.quantile(0.95) is None
    rng = np.random.default_rng(0)
    values = rng.exponential(0.1, 50)
    times = np.sort(rng.uniform(0, 1, 50))
    for t, v in zip(times[::-1], values, strict=True):  # out of order on purpose
        window.add(float(t), float(v))
    assert window.count == 50
    for q in (0.0, 0.5, 0.95, 1.0):
        assert window.quantile(q) == pytest.approx(np.quantile(values, q))
    window.prune(now=1.0 + float(times[10]))
    assert window.count == 40
    with pytest.raises(ConfigError):
        window.add(0.0, -1.0)
    with pytest.raises(ConfigError):
        LatencyWindow(0.0)


def test_sustained_high_latency_prunes_after_sustain() -> None:
    policy = ReactivePolicy(_config())
    actions = _run(policy, lambda t: 0.5 if t < 10 else 2.0, until=19.9)
    assert len(actions) == 1
    (act,) = actions
    assert act.kind is ActionKind.PRUNE
    assert act.since == pytest.approx(10.5)  # first decide that saw the quantile above 1.2 s
    assert act.at == pytest.approx(15.5)
    assert act.latency_s == pytest.approx(2.0) and act.samples >= 5
    assert "above LAT_trigger 1.200" in act.reason
    assert act.to_dict()["kind"] == "prune"


def test_short_spike_does_not_trigger() -> None:
    policy = ReactivePolicy(_config())
    spike = _run(policy, lambda t: 3.0 if 10 <= t < 12 else 0.8, until=60)
    assert spike == []
    # ... but the same spike held for longer does
    policy = ReactivePolicy(_config())
    assert len(_run(policy, lambda t: 3.0 if 10 <= t < 16 else 0.8, until=60)) == 1


def test_cooldown_then_prune_again_then_restore() -> None:
    policy = ReactivePolicy(_config())

    def latency(t: float) -> float:
        return 0.8 if t < 10 else 2.0 if t < 35 else 0.3

    actions = _run(policy, latency, until=100)
    kinds = [(a.kind, a.at) for a in actions]
    # prune at 15.5; nothing during the 10 s cooldown; the window was emptied, so the quantile
    # is high again from 25.5 and a second prune follows 5 s later. Latency falls at 35: after
    # the second cooldown (to 40.5) it stays below 0.6 s for 30 s -> restore at 70.5.
    assert kinds == [
        (ActionKind.PRUNE, pytest.approx(15.5)),
        (ActionKind.PRUNE, pytest.approx(30.5)),
        (ActionKind.RESTORE, pytest.approx(70.5)),
    ]
    assert actions[-1].latency_s == pytest.approx(0.3)


def test_between_thresholds_nothing_happens() -> None:
    policy = ReactivePolicy(_config())
    assert _run(policy, lambda t: 0.9, until=120) == []


def test_can_prune_false_defers_the_action() -> None:
    policy = ReactivePolicy(_config())
    assert _run(policy, lambda t: 2.0, until=20, can_prune=False) == []
    act = policy.decide(20.0)
    assert act is not None and act.kind is ActionKind.PRUNE


def test_too_few_samples_means_no_decision() -> None:
    policy = ReactivePolicy(_config(min_samples=50))  # a 2 s window holds only 40
    assert _run(policy, lambda t: 5.0, until=60) == []
    policy = ReactivePolicy(_config())
    assert _run(policy, lambda t: 0.1 if round(t / SAMPLE_DT) % 40 == 0 else None, until=60) == []


def test_a_quiet_spell_does_not_break_a_restore_condition() -> None:
    # low latency, but sparse: bursts of 1 s (20 exits) every 4 s, so most 2 s windows hold
    # too few exits; the restore condition holds across the quiet spells
    def sparse_low(t: float) -> float | None:
        return 0.1 if t % 4.0 < 1.0 else None

    actions = _run(ReactivePolicy(_config(min_samples=10)), sparse_low, until=60)
    assert [a.kind for a in actions] == [ActionKind.RESTORE]
    assert actions[0].at - actions[0].since >= 30.0

    # a prune condition does not survive a gap: high only in the same sparse bursts -> no prune
    def sparse_high(t: float) -> float | None:
        return 5.0 if t % 4.0 < 1.0 else None

    assert _run(ReactivePolicy(_config(min_samples=10, sustain_s=3.0)), sparse_high, until=60) == []


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from([0.2, 0.8, 1.5, 4.0]), min_size=5, max_size=40))
def test_actions_respect_thresholds_and_cooldown(levels: list[float]) -> None:
    """Any timeline (latency level changing every 3 s): actions are at least a cooldown apart
    and each agrees with its own quantile."""
    cfg = _config()
    policy = ReactivePolicy(cfg)
    actions = _run(
        policy, lambda t: levels[min(int(t // 3), len(levels) - 1)], until=3.0 * len(levels)
    )
    for a, b in itertools.pairwise(actions):
        assert b.at - a.at >= cfg.cooldown_s
    for a in actions:
        if a.kind is ActionKind.PRUNE:
            assert a.latency_s > cfg.trigger_s and a.at - a.since >= cfg.sustain_s
        else:
            assert a.latency_s < cfg.restore_threshold_s and a.at - a.since >= cfg.restore_sustain_s


@pytest.mark.parametrize(
    "overrides",
    [
        {"slo_s": 0.0},
        {"quantile": 0.0},
        {"quantile": 1.5},
        {"window_s": 0.0},
        {"sustain_s": -1.0},
        {"cooldown_s": float("nan")},
        {"min_samples": 0},
        {"restore_below_s": 1.3},  # above LAT_trigger: prune and restore would chase each other
        {"margin_s": -1.0},
    ],
)
def test_reactive_config_validation(overrides: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        _config(**overrides)


def test_arrival_rate_is_unbiased_early_and_decays() -> None:
    rate = ArrivalRate(tau_s=5.0, start=0.0)
    assert rate.rate(0.0) is None
    for k in range(1, 301):  # 10 per second for 30 s
        rate.observe(k * 0.1)
        if k in (20, 100, 300):
            assert rate.rate(k * 0.1) == pytest.approx(10.0, rel=0.06)
    assert rate.rate(30.0 + 5.0) == pytest.approx(10.0 / np.e, rel=0.06)
    assert rate.total == 300


def test_predicted_latency_md1() -> None:
    latency, rhos = predicted_latency(10.0, [0.05, 0.08], [0, 0])
    assert rhos == pytest.approx((0.5, 0.8))
    # M/D/1 mean wait rho S / (2 (1 - rho))
    assert latency == pytest.approx(0.05 + 0.025 + 0.08 + 0.16)
    assert predicted_latency(10.0, [0.05], [10])[0] == pytest.approx(0.05 * 11)  # backlog wins
    assert predicted_latency(10.0, [0.1], [0])[0] == float("inf")


def _proactive_run(
    policy: ProactivePolicy,
    rate: float,
    service: list[float],
    until: float,
    start: float = 0.0,
    restore: list[float] | None = None,
    report: Callable[[float], bool] = lambda t: True,
) -> list[Action]:
    actions = []
    t, next_arrival = start, start + 1 / rate
    while t < until - 1e-9:
        t = round(t + DECIDE_DT, 9)
        while next_arrival <= t:
            policy.observe_arrival(next_arrival)
            next_arrival += 1 / rate
        for i, s in enumerate(service):
            if report(t):
                policy.observe_stage(t, i, queue_depth=0, service_s=s)
        action = policy.decide(t, restore_service_s=restore)
        if action is not None:
            actions.append(action)
    return actions


def test_proactive_prunes_on_utilisation_before_the_slo_breaks() -> None:
    cfg = ProactiveConfig(slo_s=1.0)
    policy = ProactivePolicy(cfg, n_stages=2, start=0.0)
    # rho = (0.575, 0.92): predicted latency ~0.62 s, under the SLO, but stage 1 is near saturation
    actions = _proactive_run(policy, 11.5, [0.05, 0.08], until=5.0)
    assert len(actions) == 1
    act = actions[0]
    assert act.kind is ActionKind.PRUNE
    assert act.latency_s < cfg.slo_s
    assert act.utilisation[1] == pytest.approx(0.92, rel=0.05)
    assert act.required_capacity_s == pytest.approx(0.75 / 11.5, rel=0.05)
    assert act.at - act.since >= cfg.sustain_s
    assert "stage 1" in act.reason


def test_proactive_holds_at_moderate_load_and_restores_at_low_load() -> None:
    cfg = ProactiveConfig(slo_s=1.0)
    policy = ProactivePolicy(cfg, n_stages=2, start=0.0)
    assert _proactive_run(policy, 8.0, [0.05, 0.08], until=40.0, restore=[0.06, 0.1]) == []
    policy = ProactivePolicy(cfg, n_stages=2, start=0.0)
    assert _proactive_run(policy, 3.0, [0.05, 0.06], until=60.0) == []  # no restore prediction
    policy = ProactivePolicy(cfg, n_stages=2, start=0.0)
    actions = _proactive_run(policy, 3.0, [0.05, 0.06], until=60.0, restore=[0.06, 0.08])
    assert [a.kind for a in actions] == [ActionKind.RESTORE, ActionKind.RESTORE]
    assert actions[1].at - actions[0].at >= cfg.cooldown_s + cfg.restore_sustain_s
    assert actions[0].at - actions[0].since == pytest.approx(cfg.restore_sustain_s)


def test_proactive_needs_fresh_metrics_from_every_stage() -> None:
    cfg = ProactiveConfig(slo_s=1.0, sustain_s=10.0)
    policy = ProactivePolicy(cfg, n_stages=2, start=0.0)
    overloaded = _proactive_run(policy, 20.0, [0.05, 0.08], until=20.0)
    assert [a.at for a in overloaded] == [pytest.approx(10.5)]
    # metrics stop after t = 1: from t = 6.5 on they are stale, and the condition is dropped
    policy = ProactivePolicy(cfg, n_stages=2, start=0.0)
    assert _proactive_run(policy, 20.0, [0.05, 0.08], until=30.0, report=lambda t: t <= 1) == []
    with pytest.raises(ConfigError):
        policy.observe_stage(0.0, 2, 0, 0.1)


@pytest.mark.parametrize(
    "overrides",
    [
        {"rho_low": 0.8},
        {"rho_high": 1.2},
        {"rho_target": 0.95},
        {"slo_s": -1.0},
        {"rate_tau_s": 0.0},
        {"min_arrivals": 0},
        {"cooldown_s": -1.0},
    ],
)
def test_proactive_config_validation(overrides: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        ProactiveConfig(**{"slo_s": 1.0, **overrides})  # type: ignore[arg-type]


def test_proactive_escalates_within_the_cooldown_when_the_new_levels_fall_short() -> None:
    cfg = ProactiveConfig(slo_s=0.5, cooldown_s=10.0, escalate_after_s=2.0)
    policy = ProactivePolicy(cfg, n_stages=1, start=0.0)
    # overloaded: rho = 10 x 0.12 = 1.2 -> PRUNE after sustain_s
    first = _proactive_run(policy, 10.0, [0.12], until=3.0)
    assert [a.kind for a in first] == [ActionKind.PRUNE]
    t0 = first[0].at
    # the first prune fell short (rho 0.95 with empty queues, deep queue still draining):
    # a second PRUNE comes escalate_after_s + sustain_s later, well inside the cooldown
    more = _proactive_run(policy, 10.0, [0.095], until=t0 + 6.0, start=3.0)
    assert [a.kind for a in more] == [ActionKind.PRUNE]
    assert t0 + cfg.escalate_after_s + cfg.sustain_s - 0.3 <= more[0].at < t0 + cfg.cooldown_s
    assert more[0].reason.startswith("escalate")


def test_proactive_does_not_escalate_on_a_draining_backlog_alone() -> None:
    cfg = ProactiveConfig(slo_s=0.5, cooldown_s=10.0, escalate_after_s=2.0)
    policy = ProactivePolicy(cfg, n_stages=1, start=0.0)
    first = _proactive_run(policy, 10.0, [0.12], until=3.0)
    assert len(first) == 1
    # the new level has capacity (rho 0.5) but 30 requests still wait: no action in the
    # cooldown (the queue drains by itself); without escalation the old rule would prune again
    # as soon as the cooldown ends if the queue were still there
    t0 = first[0].at

    def deep_queue(t: float) -> bool:
        policy.observe_stage(t, 0, queue_depth=30, service_s=0.05)
        return False

    assert (
        _proactive_run(
            policy, 10.0, [0.05], until=t0 + cfg.cooldown_s - 0.1, start=3.0, report=deep_queue
        )
        == []
    )
