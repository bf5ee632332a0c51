"""Which levels a PRUNE or a RESTORE sets: the optimizer, fed with live slowdowns and the
capacity the arrival rate needs. Pure functions, no clock, no network.

Capacity target: with arrival rate ``lambda``, every stage must serve a request in at most
``target_s = rho_target / lambda`` seconds to stay at utilisation ``rho_target``.

- **PRUNE**, objective ``bottleneck`` (default): ``solve_bottleneck(..., target_s=target_s)``:
  the minimum bottleneck time subject to ``a(p) >= A_min``, relaxed to the most accurate
  levels whose every stage meets the target when that is possible. A fast stage is therefore
  not pruned (it costs accuracy and buys no throughput). Objective ``sum`` (the paper's):
  ``solve_sum`` (minimum unloaded end-to-end time). Without a known arrival rate, no target.
- **Escalation.** If the optimizer proposes no level above the current ones (the model
  believes the current levels suffice, yet the trigger saw the SLO broken), the measurement
  wins: the stage with the largest live service time whose next level still meets
  ``A_min`` goes up one level. With the bottleneck objective only a stage whose measured
  utilisation (``rate x live service time``) is at least ``rho_target`` qualifies: pruning a
  stage that is not loaded costs accuracy and buys no throughput (when the bottleneck is
  already at its deepest level, nothing more is done). With ``sum`` (or no known rate) any
  stage qualifies, as in the paper.
- **RESTORE**, both objectives: the most accurate levels that still meet the capacity target
  (``solve_bottleneck(..., target_s=rho_restore / lambda)``, ``rho_restore`` = ``rho_target``
  for the reactive policy, ``rho_low`` for the proactive one, whose restore condition is that
  every stage stays below ``rho_low``), never above the current ones. While the
  slowdown lasts this keeps the levels it needs; once it ends (the live slowdown falls back)
  the levels return to 0.
- **Step-down probe.** The live model is the calibrated curve times one slowdown factor per
  stage. On a real node part of the time does not shrink with pruning (decoding, scheduling,
  interpreter overhead), so measured at a deep level the factor is inflated, and extrapolated
  back to level 0 it can block every restore although the stage is nearly idle. So when the
  model restores nothing, a stage whose MEASURED utilisation at its current level
  (``rate x live service time``) is below ``rho_low`` steps down one level (the least
  utilised first); measuring again after each step keeps this safe. Without a known rate,
  every pruned stage steps down one level.

Both return None when they would change nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from controller.optimizer import Decision, Objective, solve_bottleneck, solve_sum
from pipeline.calibration import LinearFit, LogisticAccuracyFit


@dataclass(frozen=True)
class PlanInputs:
    """What the planner needs: the calibration, A_min and the live state."""

    fits: tuple[LinearFit, ...]
    accuracy: LogisticAccuracyFit
    a_min: float
    ratios: tuple[float, ...]
    slowdowns: tuple[float, ...]
    current: tuple[int, ...]
    rate: float | None
    rho_target: float
    objective: Objective
    rho_low: float = 0.5
    rho_restore: float | None = None  # utilisation a restore plans for; None: rho_target

    @property
    def target_s(self) -> float | None:
        return self.rho_target / self.rate if self.rate else None

    @property
    def restore_target_s(self) -> float | None:
        rho = self.rho_target if self.rho_restore is None else self.rho_restore
        return rho / self.rate if self.rate else None


@dataclass(frozen=True)
class LevelChange:
    """A change of the pipeline's pruning levels (a PRUNE or a RESTORE): the new levels, what
    the models predict for them, and how they were found."""

    levels: tuple[int, ...]
    predicted: Decision
    target_s: float | None
    how: str  # "optimizer", "escalated", "capacity" or "step-down"


def evaluate(inputs: PlanInputs, levels: Sequence[int]) -> Decision:
    """The models' prediction for ``levels`` (live slowdowns applied)."""
    ratios = tuple(inputs.ratios[lv] for lv in levels)
    stage = tuple(
        max(0.0, f.predict(r)) * s
        for f, r, s in zip(inputs.fits, ratios, inputs.slowdowns, strict=True)
    )
    accuracy = float(inputs.accuracy.predict(list(ratios)))
    return Decision(
        levels=tuple(int(v) for v in levels),
        ratios=ratios,
        stage_s=stage,
        predicted_latency_s=float(sum(stage)),
        predicted_bottleneck_s=float(max(stage)),
        predicted_accuracy=accuracy,
        objective=inputs.objective,
        feasible=accuracy >= inputs.a_min,
    )


def solve(inputs: PlanInputs) -> Decision:
    """The optimizer's levels for these inputs, whatever the current ones: ``solve_bottleneck``
    with the capacity target ``rho_target / rate`` (objective ``bottleneck``) or ``solve_sum``."""
    if inputs.objective == "bottleneck":
        return solve_bottleneck(
            inputs.fits,
            inputs.accuracy,
            inputs.a_min,
            ratios=inputs.ratios,
            slowdowns=inputs.slowdowns,
            target_s=inputs.target_s,
        )
    return solve_sum(
        inputs.fits,
        inputs.accuracy,
        inputs.a_min,
        ratios=inputs.ratios,
        slowdowns=inputs.slowdowns,
    )


def plan_prune(inputs: PlanInputs) -> LevelChange | None:
    """Levels for a PRUNE (at least one stage goes up), or None if nothing can be pruned."""
    d = solve(inputs)
    if d.feasible and any(new > old for new, old in zip(d.levels, inputs.current, strict=True)):
        return LevelChange(d.levels, evaluate(inputs, d.levels), inputs.target_s, "optimizer")
    levels = escalate(inputs)
    if levels is None:
        return None
    return LevelChange(levels, evaluate(inputs, levels), inputs.target_s, "escalated")


def escalate(inputs: PlanInputs) -> tuple[int, ...] | None:
    """One level more on the slowest stage (by live service time) that can take it within
    ``A_min`` (and, for the bottleneck objective, is loaded); None when no stage can."""
    current = inputs.current
    now = evaluate(inputs, current).stage_s
    loaded_only = inputs.objective == "bottleneck" and inputs.rate is not None
    for i in sorted(range(len(current)), key=lambda k: -now[k]):
        if current[i] + 1 >= len(inputs.ratios):
            continue
        if loaded_only and (inputs.rate or 0.0) * now[i] < inputs.rho_target:
            continue
        levels = tuple(lv + 1 if k == i else lv for k, lv in enumerate(current))
        if evaluate(inputs, levels).feasible:
            return levels
    return None


def plan_restore(inputs: PlanInputs) -> LevelChange | None:
    """Levels for a RESTORE (no stage goes up, at least one down), or None."""
    current = inputs.current
    if not any(current):
        return None
    target = inputs.restore_target_s
    if target is None:
        levels = tuple(max(0, lv - 1) for lv in current)
        return LevelChange(levels, evaluate(inputs, levels), None, "step-down")
    d = solve_bottleneck(
        inputs.fits,
        inputs.accuracy,
        inputs.a_min,
        ratios=inputs.ratios,
        slowdowns=inputs.slowdowns,
        target_s=target,
    )
    levels = tuple(min(new, old) for new, old in zip(d.levels, current, strict=True))
    if levels != current:
        return LevelChange(levels, evaluate(inputs, levels), target, "capacity")
    rate = inputs.rate or 0.0
    rho = [rate * t for t in evaluate(inputs, current).stage_s]
    idle = [i for i, lv in enumerate(current) if lv > 0 and rho[i] < inputs.rho_low]
    if not idle:
        return None
    stage = min(idle, key=lambda i: rho[i])
    levels = tuple(lv - 1 if i == stage else lv for i, lv in enumerate(current))
    return LevelChange(levels, evaluate(inputs, levels), target, "step-down")
