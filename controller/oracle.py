"""The oracle policy: the levels the optimizer would choose if it knew the slowdowns in advance.

An experiment knows its scenario: every node's emulated slowdown (a constant factor times the
factor of any transient window in force) on a clock shared with the trace replay, and the
trace itself. :class:`OracleSchedule` is that knowledge, cut into segments at every window start
and end: per segment, each stage's known slowdown factor and the arrival rate the trace will
bring. :class:`OraclePolicy` computes, once and in advance, the levels of every segment with the
very planner the live policies use (:func:`controller.level_change.solve`: same objective, A_min,
``rho_target`` and capacity target ``rho_target / rate``), fed with the KNOWN factor where the
proactive policy feeds the live slowdown estimate, and sets them at the first decision tick at
or after each segment's start (one decision per segment; nothing in between).

It is the limit a controller can reach in a scenario when its only difficulty is not knowing
what comes next: it never waits for a trigger, and it restores the moment a window ends. It is
not clairvoyant about the machine: the emulated factor multiplies a node's real per-request
time, which is larger than the calibrated one (decoding, publishing, CPU contention). That
machine factor it measures, from the live slowdown, only at level 0 and away from window
boundaries (:meth:`OraclePolicy.observe`), and plans each segment for known factor x machine
factor.

No clock and no network here: :meth:`OraclePolicy.decide` takes the wall-clock time from the
caller.
"""

from __future__ import annotations

import bisect
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from controller.level_change import LevelChange, PlanInputs, evaluate, solve
from controller.policy import Action, ActionKind
from pipeline.errors import ConfigError
from pipeline.jsonfile import read_json


@dataclass(frozen=True)
class OracleSegment:
    """From ``start_s`` (experiment clock) until the next segment: each stage's known slowdown
    (relative to the calibration) and the arrival rate planned for (None or 0: no arrivals)."""

    start_s: float
    slowdowns: tuple[float, ...]
    rate: float | None

    def __post_init__(self) -> None:
        if not math.isfinite(self.start_s):
            raise ConfigError(f"oracle segment start must be finite, got {self.start_s}")
        if not self.slowdowns or any(not math.isfinite(k) or k <= 0 for k in self.slowdowns):
            raise ConfigError(f"oracle slowdowns must be positive, got {list(self.slowdowns)}")
        if self.rate is not None and (not math.isfinite(self.rate) or self.rate < 0):
            raise ConfigError(f"oracle arrival rate must be >= 0, got {self.rate}")

    def describe(self) -> str:
        slow = ", ".join(f"x{k:.3g}" for k in self.slowdowns)
        rate = "no arrivals" if not self.rate else f"{self.rate:.1f} req/s"
        return f"from {self.start_s:g} s: slowdowns {slow}, {rate}"


@dataclass(frozen=True)
class OracleSchedule:
    """The scenario as the oracle knows it: ``clock_start`` (epoch seconds of clock 0) and the
    segments in time order. The first segment also covers everything before its start."""

    clock_start: float
    segments: tuple[OracleSegment, ...]

    def __post_init__(self) -> None:
        if not self.segments:
            raise ConfigError("an oracle schedule needs at least one segment")
        starts = [s.start_s for s in self.segments]
        if starts != sorted(starts) or len(set(starts)) != len(starts):
            raise ConfigError(f"oracle segments must start in increasing order, got {starts}")
        n = len(self.segments[0].slowdowns)
        if any(len(s.slowdowns) != n for s in self.segments):
            raise ConfigError("every oracle segment needs one slowdown per stage")

    @property
    def n_stages(self) -> int:
        return len(self.segments[0].slowdowns)

    def index_at(self, t: float) -> int:
        """The segment in force at ``t`` seconds on the experiment clock."""
        return max(0, bisect.bisect_right([s.start_s for s in self.segments], t) - 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "oracle-schedule",
            "clock_start": self.clock_start,
            "segments": [
                {"start_s": s.start_s, "slowdowns": list(s.slowdowns), "rate": s.rate}
                for s in self.segments
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OracleSchedule:
        try:
            segments = tuple(
                OracleSegment(
                    float(s["start_s"]),
                    tuple(float(k) for k in s["slowdowns"]),
                    None if s.get("rate") is None else float(s["rate"]),
                )
                for s in data["segments"]
            )
            return cls(float(data["clock_start"]), segments)
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"bad oracle schedule: {exc!r}") from exc

    def save(self, path: Path) -> Path:
        path.write_text(json.dumps(self.to_dict(), indent=1), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: Path) -> OracleSchedule:
        data = read_json(path, "the oracle schedule")
        if not isinstance(data, dict):
            raise ConfigError(f"the oracle schedule {path} is not a JSON object")
        return cls.from_dict(data)


def segment_plan(base: PlanInputs, segment: OracleSegment) -> LevelChange:
    """The optimizer's levels for one segment: ``base`` (calibration, A_min, objective,
    rho_target) with the segment's known slowdowns and arrival rate. With no arrivals there is
    nothing to serve, and the levels are 0 (full accuracy)."""
    inputs = replace(base, slowdowns=segment.slowdowns, rate=segment.rate or None)
    if not segment.rate:
        levels = (0,) * len(segment.slowdowns)
        return LevelChange(levels, evaluate(inputs, levels), None, "oracle")
    d = solve(inputs)
    return LevelChange(d.levels, evaluate(inputs, d.levels), inputs.target_s, "oracle")


class OraclePolicy:
    """Sets each segment's levels once, at the first decision in that segment.

    ``plans`` are the levels for the known factors alone. The calibration is measured on the
    bare machine, without a node's per-request overhead, so a real node is slower than
    "calibration x emulated factor" by a factor of its own (the MACHINE factor: the live
    slowdown divided by the known factor, a few x on a busy 2-core host). The live policies
    measure it all the time; the oracle measures it only where it cannot be confused with the
    windows it knows: at level 0, once a segment has lasted ``settle_s`` (the live estimate's
    own lag), via :meth:`observe`. Once it has a measurement, a segment's levels are planned
    at its start for known factor x machine factor."""

    def __init__(self, schedule: OracleSchedule, base: PlanInputs, settle_s: float = 2.0) -> None:
        if schedule.n_stages != len(base.fits):
            raise ConfigError(
                f"the oracle schedule has {schedule.n_stages} stages, the calibration "
                f"{len(base.fits)}"
            )
        self.schedule = schedule
        self.base = base
        self.settle_s = settle_s
        self.plans = tuple(segment_plan(base, s) for s in schedule.segments)
        self.machine: list[float | None] = [None] * schedule.n_stages
        self._applied: int | None = None

    def observe(self, wall: float, levels: Sequence[int], live: Sequence[float | None]) -> None:
        """A decision tick's live slowdowns (None: not measured yet) at these levels."""
        t = wall - self.schedule.clock_start
        index = self.schedule.index_at(t)
        if index and t - self.schedule.segments[index].start_s < self.settle_s:
            return
        known = self.schedule.segments[index].slowdowns
        for i, (level, value) in enumerate(zip(levels, live, strict=True)):
            if level == 0 and value is not None and value > 0:
                self.machine[i] = value / known[i]

    def plan_for(self, index: int) -> LevelChange:
        """Segment ``index``'s levels: known factors x the machine factors measured so far."""
        if all(m is None for m in self.machine):
            return self.plans[index]
        segment = self.schedule.segments[index]
        slowdowns = tuple(
            k * (1.0 if m is None else m)
            for k, m in zip(segment.slowdowns, self.machine, strict=True)
        )
        return segment_plan(self.base, replace(segment, slowdowns=slowdowns))

    def decide(
        self, now: float, wall: float, current: Sequence[int]
    ) -> tuple[Action, LevelChange] | None:
        """The action and levels for the segment in force at epoch ``wall`` (None when that
        segment was already handled, or its levels are the current ones)."""
        index = self.schedule.index_at(wall - self.schedule.clock_start)
        if index == self._applied:
            return None
        self._applied = index
        plan = self.plan_for(index)
        if tuple(plan.levels) == tuple(current):
            return None
        up = any(new > old for new, old in zip(plan.levels, current, strict=True))
        segment = self.schedule.segments[index]
        machine = ", ".join("?" if m is None else f"x{m:.2f}" for m in self.machine)
        action = Action(
            kind=ActionKind.PRUNE if up else ActionKind.RESTORE,
            at=now,
            reason=f"oracle: segment {segment.describe()}; machine factors {machine}",
            latency_s=plan.predicted.predicted_latency_s,
            samples=0,
            since=now,
            required_capacity_s=plan.target_s,
        )
        return action, plan
