"""When to prune and when to restore: pure, deterministic trigger policies.

Nothing here reads a clock: every method takes ``now`` (monotonic seconds) from the caller, so
a test can feed a synthetic timeline. The controller calls ``observe...`` as data arrives and
``decide(now)`` regularly (every few hundred milliseconds); sustain times are measured between
``decide`` calls, so their resolution is the caller's decide period.

Two policies return the same :class:`Action`:

- :class:`ReactivePolicy`, the paper's trigger. It keeps a :class:`LatencyWindow` of
  end-to-end latencies and watches one quantile of it (p95 by default). PRUNE when the quantile
  stays above ``LAT_trigger = slo + margin`` continuously for ``sustain_s``; RESTORE when it
  stays below ``restore_below_s`` (default 0.6 x SLO) for ``restore_sustain_s``. After either
  action nothing happens for ``cooldown_s``, and the window is emptied: the new levels are
  judged only by latencies measured after they were chosen. A spike of length D keeps the
  window quantile up for at most about ``D + window_s``, so spikes shorter than
  ``sustain_s - window_s`` never trigger; choose ``window_s`` well below ``sustain_s``.
  Fewer than ``min_samples`` latencies in the window means no decision: an empty window may be
  an idle camera or a stalled pipeline, and the two call for opposite actions.
- :class:`ProactivePolicy` acts before the SLO is broken, from the nodes' metrics instead of
  finished requests. With the arrival rate ``lambda`` (a time-decayed average of the arrivals
  the caller reports, :class:`ArrivalRate`) and each stage's service time ``S_i`` and queue
  depth ``q_i``, stage i's utilisation is ``rho_i = lambda S_i`` and its predicted latency is
  ``S_i + max(q_i S_i, W_i)``: the backlog a request arriving now finds, or the M/D/1
  steady-state mean wait ``W_i = rho_i S_i / (2 (1 - rho_i))`` (infinite at ``rho_i >= 1``),
  whichever is larger. The predicted end-to-end latency is the sum over stages (transfers are
  not modelled). PRUNE when it exceeds the SLO or any ``rho_i > rho_high``, sustained for
  ``sustain_s`` (short); RESTORE when, with the service times the caller predicts for the
  restored levels, every ``rho_i < rho_low`` and the predicted latency is within the SLO, for
  ``restore_sustain_s``. Both actions carry ``required_capacity_s = rho_target / lambda``, the
  largest per-stage service time that keeps every stage at ``rho_target``; the optimizer's
  ``solve_bottleneck(..., target_s=...)`` takes it. Missing or stale metrics for any stage (older
  than ``metrics_max_age_s``) mean no decision.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from pipeline.errors import ConfigError


class ActionKind(StrEnum):
    PRUNE = "prune"
    RESTORE = "restore"


@dataclass(frozen=True)
class Action:
    """A policy's decision and the inputs it was based on (for the decision log).

    ``latency_s`` is the window quantile (reactive) or the predicted end-to-end latency
    (proactive); ``samples`` the window size or the number of arrivals seen; ``since`` when the
    condition started to hold. ``required_capacity_s`` and ``utilisation`` are proactive only.
    """

    kind: ActionKind
    at: float
    reason: str
    latency_s: float
    samples: int
    since: float
    required_capacity_s: float | None = None
    utilisation: tuple[float, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value,
            "at": self.at,
            "reason": self.reason,
            "latency_s": _json_float(self.latency_s),
            "samples": self.samples,
            "since": self.since,
            "required_capacity_s": self.required_capacity_s,
            "utilisation": [_json_float(r) for r in self.utilisation],
        }


def _json_float(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _finite(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{what} must be a finite number, got {value!r}")
    return float(value)


class LatencyWindow:
    """Latency samples ``(t, latency_s)`` of the last ``window_s`` seconds, keyed by time."""

    def __init__(self, window_s: float) -> None:
        _check(_finite(window_s, "window_s") > 0, f"window_s must be > 0, got {window_s}")
        self.window_s = float(window_s)
        self._times: list[float] = []
        self._values: list[float] = []

    def add(self, t: float, latency_s: float) -> None:
        """Add one sample; samples may arrive slightly out of order."""
        t = _finite(t, "sample time")
        latency = _finite(latency_s, "latency")
        _check(latency >= 0, f"latency must be >= 0, got {latency}")
        if not self._times or t >= self._times[-1]:
            self._times.append(t)
            self._values.append(latency)
        else:
            i = bisect.bisect_right(self._times, t)
            self._times.insert(i, t)
            self._values.insert(i, latency)

    def prune(self, now: float) -> None:
        """Drop samples older than ``now - window_s``."""
        i = bisect.bisect_left(self._times, now - self.window_s)
        if i:
            del self._times[:i]
            del self._values[:i]

    def clear(self) -> None:
        self._times.clear()
        self._values.clear()

    @property
    def count(self) -> int:
        return len(self._times)

    def quantile(self, q: float) -> float | None:
        """The q-quantile (linear interpolation, as numpy's default); None when empty."""
        _check(0.0 <= q <= 1.0, f"quantile must be in [0, 1], got {q}")
        if not self._values:
            return None
        values = sorted(self._values)
        pos = q * (len(values) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(values) - 1)
        return values[lo] + (values[hi] - values[lo]) * (pos - lo)


class _Sustain:
    """The shared state machine: a condition must hold for a while; then a cooldown."""

    def __init__(self, sustain_s: float, restore_sustain_s: float, cooldown_s: float) -> None:
        self.sustain_s = sustain_s
        self.restore_sustain_s = restore_sustain_s
        self.cooldown_s = cooldown_s
        self.high_since: float | None = None
        self.low_since: float | None = None
        self.last_action_at: float | None = None

    def in_cooldown(self, now: float) -> bool:
        return self.last_action_at is not None and now < self.last_action_at + self.cooldown_s

    def reset(self) -> None:
        self.high_since = self.low_since = None

    def quiet(self) -> None:
        """Too little data to judge: pressure must be seen without a break, so a prune
        condition starts over; a quiet spell is no pressure, so a restore condition that held
        before it still holds."""
        self.high_since = None

    def step(
        self, now: float, high: bool, low: bool, can_prune: bool, can_restore: bool
    ) -> tuple[ActionKind, float] | None:
        """Update the trackers; return the action and since when its condition held."""
        if high:
            self.low_since = None
            self.high_since = now if self.high_since is None else self.high_since
            if can_prune and now - self.high_since >= self.sustain_s:
                return ActionKind.PRUNE, self.high_since
        elif low:
            self.high_since = None
            self.low_since = now if self.low_since is None else self.low_since
            if can_restore and now - self.low_since >= self.restore_sustain_s:
                return ActionKind.RESTORE, self.low_since
        else:
            self.reset()
        return None

    def acted(self, now: float) -> None:
        self.last_action_at = now
        self.reset()


@dataclass(frozen=True)
class ReactiveConfig:
    """The paper's trigger. ``restore_below_s`` defaults to 0.6 x ``slo_s``."""

    slo_s: float
    margin_s: float = 0.0
    quantile: float = 0.95
    window_s: float = 2.0
    sustain_s: float = 5.0
    cooldown_s: float = 10.0
    restore_below_s: float | None = None
    restore_sustain_s: float = 30.0
    min_samples: int = 10

    def __post_init__(self) -> None:
        for name in (
            "slo_s",
            "margin_s",
            "quantile",
            "window_s",
            "sustain_s",
            "cooldown_s",
            "restore_sustain_s",
        ):
            _finite(getattr(self, name), name)
        _check(self.slo_s > 0, f"slo_s must be > 0, got {self.slo_s}")
        _check(0 < self.quantile <= 1, f"quantile must be in (0, 1], got {self.quantile}")
        _check(self.window_s > 0, f"window_s must be > 0, got {self.window_s}")
        for name in ("sustain_s", "cooldown_s", "restore_sustain_s"):
            _check(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        _check(
            isinstance(self.min_samples, int)
            and not isinstance(self.min_samples, bool)
            and self.min_samples >= 1,
            f"min_samples must be a positive integer, got {self.min_samples!r}",
        )
        if self.restore_below_s is not None:
            _finite(self.restore_below_s, "restore_below_s")
        _check(self.trigger_s > 0, f"LAT_trigger (slo + margin) must be > 0, got {self.trigger_s}")
        _check(
            0 <= self.restore_threshold_s < self.trigger_s,
            f"the restore threshold ({self.restore_threshold_s}) must be in [0, LAT_trigger "
            f"= {self.trigger_s}) so that pruning and restoring do not chase each other",
        )

    @property
    def trigger_s(self) -> float:
        """LAT_trigger = SLO + margin."""
        return self.slo_s + self.margin_s

    @property
    def restore_threshold_s(self) -> float:
        return 0.6 * self.slo_s if self.restore_below_s is None else self.restore_below_s


class ReactivePolicy:
    """PRUNE / RESTORE from a sustained window quantile of end-to-end latency (the paper's)."""

    def __init__(self, config: ReactiveConfig) -> None:
        self.config = config
        self.window = LatencyWindow(config.window_s)
        self._state = _Sustain(config.sustain_s, config.restore_sustain_s, config.cooldown_s)

    def observe(self, now: float, latency_s: float) -> None:
        """One finished request's end-to-end latency, observed at ``now``."""
        self.window.add(now, latency_s)

    def decide(
        self, now: float, *, can_prune: bool = True, can_restore: bool = True
    ) -> Action | None:
        """An action, or None. ``can_prune`` / ``can_restore`` say whether the levels are not
        already at their maximum / at zero (the condition is still tracked when they are)."""
        cfg, state = self.config, self._state
        self.window.prune(now)
        if state.in_cooldown(now):
            return None
        q = self.window.quantile(cfg.quantile)
        if q is None or self.window.count < cfg.min_samples:
            state.quiet()  # camera traps are idle most of the time
            return None
        result = state.step(
            now, q > cfg.trigger_s, q < cfg.restore_threshold_s, can_prune, can_restore
        )
        if result is None:
            return None
        kind, since = result
        pct = f"p{cfg.quantile * 100:g}"
        if kind is ActionKind.PRUNE:
            reason = (
                f"{pct} latency {q:.3f} s above LAT_trigger {cfg.trigger_s:.3f} s "
                f"for {now - since:.1f} s"
            )
        else:
            reason = (
                f"{pct} latency {q:.3f} s below {cfg.restore_threshold_s:.3f} s "
                f"for {now - since:.1f} s"
            )
        action = Action(
            kind=kind, at=now, reason=reason, latency_s=q, samples=self.window.count, since=since
        )
        state.acted(now)
        self.window.clear()
        return action


class ArrivalRate:
    """Arrival rate as a time-decayed average with time constant ``tau_s``.

    Every arrival adds 1 to a count that decays as ``exp(-dt / tau)``; the rate is that count
    divided by ``tau (1 - exp(-(now - start) / tau))``, which is unbiased for a steady Poisson
    stream, also in the first ``tau`` seconds. ``start`` is when counting began (default: the
    first arrival).
    """

    def __init__(self, tau_s: float, start: float | None = None) -> None:
        _check(_finite(tau_s, "tau_s") > 0, f"tau_s must be > 0, got {tau_s}")
        self.tau_s = float(tau_s)
        self.start = start
        self.total = 0
        self._count = 0.0
        self._last: float | None = None

    def observe(self, t: float, count: int = 1) -> None:
        _check(count >= 0, f"arrival count must be >= 0, got {count}")
        t = _finite(t, "arrival time")
        if self.start is None:
            self.start = t
        if self._last is not None and t > self._last:
            self._count *= math.exp(-(t - self._last) / self.tau_s)
        self._last = t if self._last is None else max(t, self._last)
        self._count += count
        self.total += count

    def rate(self, now: float) -> float | None:
        """Arrivals per second at ``now``; None before any time has passed since ``start``."""
        if self.start is None or now <= self.start:
            return None
        count = self._count
        if self._last is not None and now > self._last:
            count *= math.exp(-(now - self._last) / self.tau_s)
        return count / (self.tau_s * -math.expm1(-(now - self.start) / self.tau_s))


@dataclass(frozen=True)
class ProactiveConfig:
    """Utilisation thresholds: prune above ``rho_high``, aim at ``rho_target``, restore below
    ``rho_low`` (``0 < rho_low < rho_target < rho_high <= 1``)."""

    slo_s: float
    rho_high: float = 0.9
    rho_target: float = 0.75
    rho_low: float = 0.5
    sustain_s: float = 1.0
    cooldown_s: float = 10.0
    restore_sustain_s: float = 20.0
    rate_tau_s: float = 5.0
    metrics_max_age_s: float = 5.0
    min_arrivals: int = 5
    escalate_after_s: float = 2.0

    def __post_init__(self) -> None:
        for name in (
            "slo_s",
            "rho_high",
            "rho_target",
            "rho_low",
            "sustain_s",
            "cooldown_s",
            "restore_sustain_s",
            "rate_tau_s",
            "metrics_max_age_s",
            "escalate_after_s",
        ):
            _finite(getattr(self, name), name)
        _check(self.slo_s > 0, f"slo_s must be > 0, got {self.slo_s}")
        _check(
            0 < self.rho_low < self.rho_target < self.rho_high <= 1,
            f"need 0 < rho_low < rho_target < rho_high <= 1, got {self.rho_low}, "
            f"{self.rho_target}, {self.rho_high}",
        )
        for name in ("sustain_s", "cooldown_s", "restore_sustain_s", "escalate_after_s"):
            _check(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        _check(self.rate_tau_s > 0, f"rate_tau_s must be > 0, got {self.rate_tau_s}")
        _check(
            self.metrics_max_age_s > 0,
            f"metrics_max_age_s must be > 0, got {self.metrics_max_age_s}",
        )
        _check(
            isinstance(self.min_arrivals, int)
            and not isinstance(self.min_arrivals, bool)
            and self.min_arrivals >= 1,
            f"min_arrivals must be a positive integer, got {self.min_arrivals!r}",
        )


def predicted_latency(
    rate: float, service_s: Sequence[float], queue_depth: Sequence[float]
) -> tuple[float, tuple[float, ...]]:
    """(predicted end-to-end latency, utilisations) for stages with these service times and
    queues at arrival rate ``rate``: ``sum_i S_i + max(q_i S_i, M/D/1 wait)``."""
    total, rhos = 0.0, []
    for s, q in zip(service_s, queue_depth, strict=True):
        rho = rate * s
        wait = rho * s / (2 * (1 - rho)) if rho < 1 else math.inf
        total += s + max(q * s, wait)
        rhos.append(rho)
    return total, tuple(rhos)


class ProactivePolicy:
    """PRUNE / RESTORE from predicted utilisation and latency, before the SLO is broken."""

    def __init__(
        self,
        config: ProactiveConfig,
        n_stages: int,
        start: float | None = None,
        *,
        arrivals: ArrivalRate | None = None,
    ) -> None:
        """``arrivals``: an arrival rate kept by the caller, which the policy reads (the
        controller passes its stage-0 one; :meth:`observe_arrival` is then not used); by
        default the policy keeps its own from ``start``, fed by :meth:`observe_arrival`."""
        _check(n_stages >= 1, f"n_stages must be >= 1, got {n_stages}")
        self.config = config
        self.n_stages = n_stages
        self.arrivals = arrivals if arrivals is not None else ArrivalRate(config.rate_tau_s, start)
        self._metrics: list[tuple[float, float, float] | None] = [None] * n_stages
        self._state = _Sustain(config.sustain_s, config.restore_sustain_s, config.cooldown_s)

    def observe_arrival(self, now: float, count: int = 1) -> None:
        """Requests entering the pipeline (published images) at ``now``."""
        self.arrivals.observe(now, count)

    def observe_stage(self, now: float, stage: int, queue_depth: float, service_s: float) -> None:
        """A stage's metrics: requests waiting, and its current mean service time."""
        _check(0 <= stage < self.n_stages, f"stage must be in 0..{self.n_stages - 1}, got {stage}")
        q, s = _finite(queue_depth, "queue_depth"), _finite(service_s, "service_s")
        _check(q >= 0 and s >= 0, f"queue depth and service time must be >= 0, got {q}, {s}")
        self._metrics[stage] = (now, q, s)

    def decide(
        self,
        now: float,
        *,
        restore_service_s: Sequence[float] | None = None,
        can_prune: bool = True,
        can_restore: bool = True,
    ) -> Action | None:
        """An action, or None. ``restore_service_s``: predicted per-stage service times at the
        levels a RESTORE would set (from the calibration fits and live slowdowns); without it
        the policy never restores."""
        cfg, state = self.config, self._state
        # Within the cooldown only one thing may happen: a further PRUNE, once the levels just
        # set have been seen for escalate_after_s, if they still cannot carry the load even
        # with empty queues (the backlog left by the slowdown drains by itself). A first
        # decision taken on a half-converged slowdown estimate is corrected without waiting
        # out the cooldown; a restore always waits for it.
        escalating = state.in_cooldown(now)
        if escalating and (
            not can_prune
            or state.last_action_at is None
            or now - state.last_action_at < cfg.escalate_after_s
        ):
            return None
        rate = self.arrivals.rate(now)
        fresh = [m for m in self._metrics if m is not None and now - m[0] <= cfg.metrics_max_age_s]
        if rate is None or self.arrivals.total < cfg.min_arrivals or len(fresh) < self.n_stages:
            state.reset()
            return None
        service = [m[2] for m in fresh]
        queues = [m[1] for m in fresh]
        # escalating: judge the new levels' capacity, not the backlog that drains by itself
        latency, rhos = predicted_latency(
            rate, service, [0.0] * len(service) if escalating else queues
        )
        high = latency > cfg.slo_s or max(rhos) > cfg.rho_high
        low = False
        if restore_service_s is not None and not escalating:
            _check(
                len(restore_service_s) == self.n_stages,
                f"need {self.n_stages} restore service times, got {len(restore_service_s)}",
            )
            restored_latency, restored_rhos = predicted_latency(rate, restore_service_s, queues)
            low = max(restored_rhos) < cfg.rho_low and restored_latency <= cfg.slo_s
        result = state.step(now, high, low, can_prune, can_restore)
        if result is None:
            return None
        kind, since = result
        worst = max(range(self.n_stages), key=lambda i: rhos[i])
        if kind is ActionKind.PRUNE and escalating:
            reason = (
                f"escalate: the levels just set still predict {latency:.3f} s with empty "
                f"queues (SLO {cfg.slo_s:.3f} s), stage {worst} utilisation "
                f"{rhos[worst]:.2f} at {rate:.2f} req/s for {now - since:.1f} s"
            )
        elif kind is ActionKind.PRUNE:
            reason = (
                f"predicted latency {latency:.3f} s (SLO {cfg.slo_s:.3f} s), stage {worst} "
                f"utilisation {rhos[worst]:.2f} (high {cfg.rho_high:.2f}) at "
                f"{rate:.2f} req/s for {now - since:.1f} s"
            )
        else:
            reason = (
                f"restored levels would keep every stage below utilisation "
                f"{cfg.rho_low:.2f} at {rate:.2f} req/s for {now - since:.1f} s"
            )
        action = Action(
            kind=kind,
            at=now,
            reason=reason,
            latency_s=latency,
            samples=self.arrivals.total,
            since=since,
            required_capacity_s=cfg.rho_target / rate if rate > 0 else None,
            utilisation=rhos,
        )
        state.acted(now)
        return action
