"""Choosing per-slice pruning levels: exact, and fast enough to run on every trigger.

Slice i has discrete levels ``l = 0..L-1`` with ratios ``0 = r_0 < r_1 < ...`` (default six,
0 to 0.5). Its predicted time at level l is ``t_i(l) = max(0, a_i r_l + b_i) * s_i``, where
``(a_i, b_i)`` is the slice's calibrated :class:`~pipeline.calibration.latency.LinearFit` and
``s_i >= 1`` is the LIVE slowdown of the node running it (measured service time / predicted
service time at its current level). Accuracy is the calibrated
:class:`~pipeline.calibration.accuracy.LogisticAccuracyFit`. Because the sigmoid is increasing,
``a(p) >= A_min`` is the LINEAR constraint ``sum_i g_i r_{l_i} >= c`` (see
:meth:`~pipeline.calibration.accuracy.LogisticAccuracyFit.score_threshold`): each slice
contributes an independent "accuracy weight" ``w_i(l) = g_i r_l`` (negative: pruning costs
accuracy).

Two objectives:

- :func:`solve_bottleneck` (the default): ``min max_i t_i`` s.t. ``a(p) >= A_min``; among
  the optimal assignments, maximum accuracy, then least total pruning. Under load this is the
  right objective. A pipeline's throughput is ``1 / max_i t_i`` (the slowest stage); requests
  queue without bound as soon as the arrival rate exceeds it, and queueing, not compute, is what
  breaks the SLO. The paper's sum objective minimises the unloaded end-to-end time instead, so
  it may spend the accuracy budget pruning a fast slice that is not the bottleneck: latency
  barely moves, queues keep growing, and accuracy is lost for nothing. The bottleneck solution
  never prunes a slice beyond what the bottleneck needs.
  Algorithm: the optimal bottleneck is one of the ``n L`` table values. For a threshold T each
  slice independently takes its most accurate level with ``t_i <= T``; feasibility is monotone
  in T, so the smallest feasible T (all candidates are evaluated at once with numpy) is optimal,
  and the per-slice choice at that T is the tie-break. O(n^2 L^2) numbers, exact.
- :func:`solve_sum` (the paper's): ``min sum_i t_i`` s.t. ``a(p) >= A_min``. This is a
  multiple-choice knapsack. Solved exactly by a Pareto-front dynamic programme: slices are added
  one at a time, keeping only the (total time, total accuracy weight) pairs not dominated by
  another (no other pair is both faster and at least as accurate); the answer is the fastest
  pair on the final front that meets the constraint. Exact for any n; the front stays small
  (hundreds of points for 8 slices x 6 levels).

Both return a :class:`Decision`. When no assignment meets ``A_min``, the result is the most
accurate assignment (all level 0 under the falling-accuracy convention ``g_i <= 0``) with
``feasible=False``. :func:`brute_force` enumerates every assignment (for tests and the bench).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from pipeline.calibration import LinearFit, LogisticAccuracyFit
from pipeline.errors import ConfigError

Objective = Literal["bottleneck", "sum"]
DEFAULT_RATIOS: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)

# Tolerance on the linear accuracy constraint, so that float rounding in a sum of weights
# does not flip an assignment that sits exactly on the boundary.
_EPS = 1e-12


@dataclass(frozen=True)
class Decision:
    """Chosen level per slice and what the models predict for it.

    ``predicted_latency_s`` is the sum of the slices' predicted times (the unloaded
    end-to-end compute time), ``predicted_bottleneck_s`` the largest one, whatever the
    objective. ``stage_s`` holds each slice's predicted time.
    """

    levels: tuple[int, ...]
    ratios: tuple[float, ...]
    stage_s: tuple[float, ...]
    predicted_latency_s: float
    predicted_bottleneck_s: float
    predicted_accuracy: float
    objective: Objective
    feasible: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "levels": list(self.levels),
            "ratios": list(self.ratios),
            "stage_s": list(self.stage_s),
            "predicted_latency_s": self.predicted_latency_s,
            "predicted_bottleneck_s": self.predicted_bottleneck_s,
            "predicted_accuracy": self.predicted_accuracy,
            "objective": self.objective,
            "feasible": self.feasible,
        }


@dataclass(frozen=True)
class _Tables:
    """Per-slice tables: times ``t[i, l]`` and accuracy weights ``w[i, l] = g_i r_l``."""

    t: NDArray[np.float64]
    w: NDArray[np.float64]
    c: float  # the constraint is sum_i w[i, l_i] >= c
    ratios: NDArray[np.float64]
    accuracy: LogisticAccuracyFit


def _tables(
    latency: Sequence[LinearFit],
    accuracy: LogisticAccuracyFit,
    a_min: float,
    ratios: Sequence[float],
    slowdowns: Sequence[float] | None,
) -> _Tables:
    n = len(latency)
    if n == 0:
        raise ConfigError("need at least one slice")
    if accuracy.n_slices != n:
        raise ConfigError(
            f"{n} latency fits but the accuracy fit covers {accuracy.n_slices} slices"
        )
    r = np.asarray(ratios, dtype=np.float64)
    if r.ndim != 1 or r.size == 0 or r[0] != 0.0 or np.any(np.diff(r) <= 0) or r[-1] >= 1.0:
        raise ConfigError(
            f"ratios must start at 0, increase strictly and stay below 1, got {list(ratios)}"
        )
    if not math.isfinite(a_min):
        raise ConfigError(f"A_min must be finite, got {a_min}")
    s = np.ones(n) if slowdowns is None else np.asarray(slowdowns, dtype=np.float64)
    if s.shape != (n,) or not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise ConfigError(f"need {n} positive finite slowdowns, got {slowdowns}")
    a = np.array([f.a for f in latency])
    b = np.array([f.b for f in latency])
    t = np.maximum(a[:, None] * r[None, :] + b[:, None], 0.0) * s[:, None]
    w = np.asarray(accuracy.g, dtype=np.float64)[:, None] * r[None, :]
    return _Tables(t=t, w=w, c=accuracy.score_threshold(a_min), ratios=r, accuracy=accuracy)


def _decision(
    tab: _Tables, levels: Sequence[int], objective: Objective, feasible: bool
) -> Decision:
    idx = np.arange(len(levels))
    lv = np.asarray(levels, dtype=np.intp)
    stage = tab.t[idx, lv]
    p = tab.ratios[lv]
    return Decision(
        levels=tuple(int(v) for v in lv),
        ratios=tuple(float(v) for v in p),
        stage_s=tuple(float(v) for v in stage),
        predicted_latency_s=float(stage.sum()),
        predicted_bottleneck_s=float(stage.max()),
        predicted_accuracy=float(tab.accuracy.predict(p)),
        objective=objective,
        feasible=feasible,
    )


def _best_levels(tab: _Tables, allowed: NDArray[np.bool_]) -> NDArray[np.intp]:
    """Per slice, the most accurate allowed level; ties go to the lowest ratio."""
    masked = np.where(allowed, tab.w, -np.inf)
    # argmax returns the first maximum, i.e. the lowest level among equally accurate ones.
    return np.asarray(np.argmax(masked, axis=1), dtype=np.intp)


def _most_accurate(tab: _Tables, objective: Objective) -> Decision:
    levels = _best_levels(tab, np.ones_like(tab.t, dtype=bool))
    return _decision(tab, levels.tolist(), objective, feasible=False)


def solve_bottleneck(
    latency: Sequence[LinearFit],
    accuracy: LogisticAccuracyFit,
    a_min: float,
    *,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    slowdowns: Sequence[float] | None = None,
    target_s: float | None = None,
) -> Decision:
    """``min max_i t_i`` s.t. ``a(p) >= a_min``; ties: max accuracy, then least pruning.

    ``target_s`` (e.g. a proactive policy's required service time) relaxes the objective: when
    the optimal bottleneck is already at or below it, return the most accurate assignment whose
    every slice meets ``target_s`` instead (less pruning, same guarantee).
    """
    tab = _tables(latency, accuracy, a_min, ratios, slowdowns)
    candidates = np.unique(tab.t)  # sorted
    # allowed[k, i, l]: may slice i use level l under threshold candidates[k]?
    allowed = tab.t[None, :, :] <= candidates[:, None, None]
    best_w = np.where(allowed, tab.w[None, :, :], -np.inf).max(axis=2).sum(axis=1)
    ok = np.flatnonzero(best_w >= tab.c - _EPS)
    if ok.size == 0:
        return _most_accurate(tab, "bottleneck")
    threshold = float(candidates[ok[0]])
    if target_s is not None and target_s > threshold:
        threshold = float(candidates[candidates <= target_s][-1])
    levels = _best_levels(tab, tab.t <= threshold)
    return _decision(tab, levels.tolist(), "bottleneck", feasible=True)


def solve_sum(
    latency: Sequence[LinearFit],
    accuracy: LogisticAccuracyFit,
    a_min: float,
    *,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    slowdowns: Sequence[float] | None = None,
) -> Decision:
    """The paper's ``min sum_i t_i`` s.t. ``a(p) >= a_min`` (exact Pareto-front DP)."""
    tab = _tables(latency, accuracy, a_min, ratios, slowdowns)
    n, n_levels = tab.t.shape
    if tab.c == math.inf:
        return _most_accurate(tab, "sum")
    # The front after slice i: arrays of total time, total weight, and back-pointers.
    cost = np.zeros(1)
    weight = np.zeros(1)
    parents: list[NDArray[np.intp]] = []
    choices: list[NDArray[np.intp]] = []
    for i in range(n):
        c2 = (cost[:, None] + tab.t[i][None, :]).ravel()
        w2 = (weight[:, None] + tab.w[i][None, :]).ravel()
        # Sort by time, then by weight descending; keep points strictly more accurate than
        # every faster (or equally fast) point before them.
        order = np.lexsort((-w2, c2))
        w_sorted = w2[order]
        prev_max = np.maximum.accumulate(np.concatenate(([-np.inf], w_sorted[:-1])))
        keep = order[w_sorted > prev_max]
        cost, weight = c2[keep], w2[keep]
        parents.append(keep // n_levels)
        choices.append(keep % n_levels)
    ok = np.flatnonzero(weight >= tab.c - _EPS)
    if ok.size == 0:
        return _most_accurate(tab, "sum")
    k = int(ok[0])  # the front is sorted by time: the first feasible point is the fastest
    levels = [0] * n
    for i in range(n - 1, -1, -1):
        levels[i] = int(choices[i][k])
        k = int(parents[i][k])
    return _decision(tab, levels, "sum", feasible=True)


def brute_force(
    latency: Sequence[LinearFit],
    accuracy: LogisticAccuracyFit,
    a_min: float,
    objective: Objective = "bottleneck",
    *,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    slowdowns: Sequence[float] | None = None,
) -> Decision:
    """Every assignment, vectorised; same objective and tie-breaks. For tests and the bench.

    Feasibility is checked on the accuracy itself (``accuracy.predict(p) >= a_min``), not on the
    linear form the solvers use.
    """
    if objective not in ("bottleneck", "sum"):
        raise ConfigError(f"objective must be 'bottleneck' or 'sum', got {objective!r}")
    tab = _tables(latency, accuracy, a_min, ratios, slowdowns)
    n, n_levels = tab.t.shape
    combos = np.indices((n_levels,) * n, dtype=np.int8).reshape(n, -1).T  # (L^n, n)
    idx = np.arange(n)
    times = tab.t[idx, combos]
    p = tab.ratios[combos]
    acc = tab.accuracy.predict(p)
    feasible = acc >= a_min
    if not feasible.any():
        return _most_accurate(tab, objective)
    primary = times.max(axis=1) if objective == "bottleneck" else times.sum(axis=1)
    keys = (p.sum(axis=1), -acc, primary, ~feasible)  # lexsort: last key is most significant
    best = int(np.lexsort(keys)[0])
    return _decision(tab, combos[best].tolist(), objective, feasible=True)
