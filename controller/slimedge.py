"""The SlimEdge planner: which device runs which contiguous slice, at which pruning level.

Given devices (speed, memory cap, link, failure probability), the per-block, per-level cost
table (:class:`CostTable`, measured with single-block :class:`~pipeline.pruning.PrunableSlice`
variants by :mod:`pipeline.calibration.slimedge`) and an accuracy model over slices
(:class:`~pipeline.calibration.accuracy.AccuracyModel`), it chooses the partition AND the level of
every slice. A slice ``[i, j)`` at level ``l`` on device ``k``:

    time   = sum_b time[b, l] / speed_k  +  (transfer_k(out[j-1, l]) if j < n)
    memory = sum_b params[b, l] * 4  +  max_b activation[b, l]        <= cap_k

Pruning cuts both terms, so a device too small for a slice at level 0 may hold it pruned
(SlimEdge's point). Devices are used in the given order and may be skipped (as
:func:`pipeline.partition.partition`). The objective is the bottleneck stage time (pipeline
throughput is its inverse) subject to ``accuracy >= floor``; with ``slo_s``, the most accurate
plan whose objective meets the SLO. Ties: more accurate, then shorter end-to-end, then fewer
stages.

**Failures** (``objective="expected"``): ``failure_prob`` is the chance that a device fails
within the horizon ``H`` (``horizon_s``). After a failure, failover re-plans on the survivors
(every node holds the full model), so the bottleneck becomes ``B*_k`` (the best one without
device k) whatever the plan was; an unused device's failure changes nothing. A plan's exposure
is the stall ``R`` (``recovery_s``) of a failover, which adds ``R^2 / (2 H)`` to the mean
latency over the horizon; the failure comes at a uniform time. First order (no failure, or
exactly one; ``q_k`` normalised over these)::

    E = B + sum_{k used} q_k * ((B*_k - B) / 2 + R^2 / (2 H))

Nothing fitting the survivors counts as ``B*_k = outage_factor x`` the failure-blind optimum.
Without the stall term a fast flaky device would always be worth using. See docs/slimedge.md.

**Search.** Exact enumeration of partitions x ordered device choices x levels when their
number, ``sum_s C(n-1, s-1) C(m, s) L^s``, is at most ``exact_limit`` (2e5: a 5-block model
with 6 levels on up to 6 devices); beyond it, NSGA-II (objectives: latency and accuracy;
constraint domination on memory overflow + accuracy deficit; seeded with the best placement
at every uniform level; the best result hill-climbed over one-step neighbours). The Pareto
front (objective vs accuracy, memory-feasible: all configurations when exact, all NSGA-II
evaluated otherwise) comes with either.

**Measured veto** (``measured``, e.g. :class:`~pipeline.calibration.accuracy.MeasuredAccuracy` on
half a of the validation split): candidates are taken in the order above and a candidate is
kept only if its real accuracy is at least ``floor + measured_margin``; a configuration
(slice bounds and levels) vetoed once is skipped on every other placement, and after
``veto_tries`` distinct vetoed configurations there is no plan. The predicted accuracy still
has to meet the floor. ``edgeprune bench planner`` chooses the margin on the other half of the
validation split.
"""

from __future__ import annotations

import bisect
import itertools
import math
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from bus.messages import LevelMessage, PlanMessage
from pipeline.calibration.accuracy import AccuracyModel
from pipeline.calibration.slimedge import CostTable, contiguous_ranges
from pipeline.devices import Device, check_unique_names
from pipeline.errors import ConfigError
from pipeline.placement import Placement, SliceBounds

Objective = Literal["bottleneck", "expected"]
Method = Literal["auto", "exact", "nsga2"]
EXACT_LIMIT = 200_000
# the measured veto's margin `edgeprune bench planner` chose on the validation split for the
# default model (docs/bench/planner.md); `edgeprune plan --veto-margin` overrides it
DEFAULT_VETO_MARGIN = 0.0
_TOL = 1e-12


@dataclass(frozen=True)
class SlimPlan:
    """A placement with a level per slice, and what the models predict for it: per stage, the
    pruning ratio of its level, its time (compute and transfer), its memory and its device's
    memory cap; for the whole, the bottleneck, end-to-end and objective times and accuracy."""

    placement: Placement
    ratios: tuple[float, ...]
    stage_s: tuple[float, ...]
    memory_bytes: tuple[float, ...]
    cap_bytes: tuple[float, ...]
    bottleneck_s: float
    total_s: float
    objective_s: float
    accuracy: float

    def __post_init__(self) -> None:
        if any(lv is None for lv in self.placement.levels):
            raise ConfigError("a SlimEdge plan gives every slice a level")
        per_stage = (self.ratios, self.stage_s, self.memory_bytes, self.cap_bytes)
        if any(len(v) != len(self.placement.stages) for v in per_stage):
            raise ConfigError("a SlimEdge plan needs one ratio, time, memory and cap per stage")

    @property
    def levels(self) -> tuple[int, ...]:
        return tuple(0 if lv is None else lv for lv in self.placement.levels)  # never None

    @property
    def bounds(self) -> list[SliceBounds]:
        return list(self.placement.bounds)

    @property
    def devices(self) -> tuple[str, ...]:
        return self.placement.nodes

    def to_message(self, version: int, reason: str = "") -> PlanMessage:
        """The retained plan nodes follow (node id = device name; the levels go on
        ``control/stage/<i>``)."""
        return PlanMessage(version, self.placement.without_levels(), reason)

    def level_messages(self, seq: int, reason: str = "") -> tuple[LevelMessage, ...]:
        """The retained level of every stage that goes out with the plan (decision ``seq``)."""
        return tuple(
            LevelMessage(stage=i, level=level, ratio=ratio, seq=seq, reason=reason)
            for i, (level, ratio) in enumerate(zip(self.levels, self.ratios, strict=True))
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "stages": [
                {
                    "start": s.bounds.start,
                    "end": s.bounds.end,
                    "device": s.node,
                    "level": s.level,
                    "ratio": ratio,
                    "time_s": time_s,
                    "memory_mb": memory / 2**20,
                    "cap_mb": cap / 2**20,
                }
                for s, ratio, time_s, memory, cap in zip(
                    self.placement.stages,
                    self.ratios,
                    self.stage_s,
                    self.memory_bytes,
                    self.cap_bytes,
                    strict=True,
                )
            ],
            "levels": list(self.levels),
            "bottleneck_s": self.bottleneck_s,
            "total_s": self.total_s,
            "objective_s": self.objective_s,
            "accuracy": self.accuracy,
        }


@dataclass(frozen=True)
class PlanResult:
    """The chosen plan (None: nothing meets the bounds), the Pareto front, how it was found."""

    best: SlimPlan | None
    front: tuple[SlimPlan, ...]
    method: str
    configurations: int
    evaluated: int
    seconds: float
    objective: Objective
    slo_met: bool | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "best": self.best.to_dict() if self.best else None,
            "front": [p.to_dict() for p in self.front],
            "method": self.method,
            "configurations": self.configurations,
            "evaluated": self.evaluated,
            "seconds": self.seconds,
            "objective": self.objective,
            "slo_met": self.slo_met,
            **self.meta,
        }


def configuration_count(
    n_blocks: int, n_devices: int, n_levels: int, max_stages: int | None = None
) -> int:
    """Partitions x ordered device choices x levels: what exact enumeration visits."""
    top = min(n_blocks, n_devices, max_stages or n_devices)
    return sum(
        math.comb(n_blocks - 1, s - 1) * math.comb(n_devices, s) * n_levels**s
        for s in range(1, top + 1)
    )


def failure_weights(devices: Sequence[Device]) -> NDArray[np.float64]:
    """``q_k``: probability that exactly device k fails, normalised over no failure and the
    single failures (independent devices)."""
    f = np.asarray([d.failure_prob for d in devices], dtype=np.float64)
    alive = np.prod(1.0 - f)
    single = np.asarray([f[k] * alive / (1.0 - f[k]) for k in range(len(f))])
    return np.asarray(single / (alive + single.sum()))


Key = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]  # edges, devices, levels


class _Space:
    """Range tables and their cost on each device: ``stage[k, r, l]``, ``fits[k, r, l]``."""

    def __init__(self, table: CostTable, devices: Sequence[Device]) -> None:
        if not devices:
            raise ConfigError("no devices to plan on")
        check_unique_names(devices)
        n = table.n_blocks
        self.ranges = contiguous_ranges(n)
        self.index = {r: k for k, r in enumerate(self.ranges)}
        t = np.asarray([table.time_s[i:j].sum(axis=0) for i, j in self.ranges])
        mem = np.asarray(
            [
                table.param_bytes[i:j].sum(axis=0) + table.activation_bytes[i:j].max(0)
                for i, j in self.ranges
            ]
        )
        out = np.asarray(
            [
                table.output_bytes[j - 1] if j < n else np.zeros(table.n_levels)
                for _, j in self.ranges
            ]
        )
        reference = table.time_s[:, 0]  # level 0 on the machine that measured the table
        speed = np.asarray(
            [d.relative_speed(table.block_names, reference.tolist()) for d in devices]
        )[:, None, None]
        bits = np.asarray([d.bandwidth_mbps * 1e6 for d in devices])[:, None, None]
        lat = np.asarray([d.latency_ms / 1e3 for d in devices])[:, None, None]
        last = np.asarray([j == n for _, j in self.ranges])[None, :, None]
        self.stage = t[None] / speed + np.where(last, 0.0, out[None] * 8.0 / bits + lat)
        self.memory = mem
        self.caps = np.asarray([d.memory_mb * 2**20 for d in devices])
        self.fits = mem[None] <= self.caps[:, None, None]
        self.overflow = np.maximum(mem[None] / self.caps[:, None, None] - 1.0, 0.0)
        self.devices = list(devices)
        self.table = table

    def plan(
        self,
        key: Key,
        bottleneck_s: float,
        total_s: float,
        objective_s: float,
        accuracy: float,
    ) -> SlimPlan:
        """The :class:`SlimPlan` of configuration ``key`` (edges, devices, levels)."""
        edges, devs, levels = key
        rows = [
            (k, self.index[(edges[t], edges[t + 1])], int(lv))
            for t, (k, lv) in enumerate(zip(devs, levels, strict=True))
        ]
        placement = Placement.build(
            [SliceBounds(edges[t], edges[t + 1]) for t in range(len(devs))],
            [self.devices[k].name for k in devs],
            [lv for _, _, lv in rows],
        )
        return SlimPlan(
            placement,
            tuple(self.table.ratios[lv] for _, _, lv in rows),
            tuple(float(self.stage[k, r, lv]) for k, r, lv in rows),
            tuple(float(self.memory[r, lv]) for _, r, lv in rows),
            tuple(float(self.caps[k]) for k, _, _ in rows),
            bottleneck_s,
            total_s,
            objective_s,
            accuracy,
        )


@dataclass
class _Evaluated:
    """Flat arrays over evaluated configurations; ``decode(i)`` gives configuration i."""

    decode: Callable[[int], Key]
    stages: NDArray[np.intp]
    objective: NDArray[np.float64]
    bottleneck: NDArray[np.float64]
    total: NDArray[np.float64]
    accuracy: NDArray[np.float64]
    fits: NDArray[np.bool_]


class Planner:
    """Chooses partitions and per-slice levels (see the module docstring)."""

    def __init__(
        self,
        table: CostTable,
        accuracy: AccuracyModel,
        *,
        exact_limit: int = EXACT_LIMIT,
        max_stages: int | None = None,
        outage_factor: float = 10.0,
        recovery_s: float = 3.0,
        horizon_s: float = 3600.0,
        population: int = 80,
        generations: int = 60,
        measured: Callable[[tuple[tuple[int, int], ...], tuple[int, ...]], float] | None = None,
        measured_margin: float = 0.0,
        veto_tries: int = 100,
    ) -> None:
        ranges = contiguous_ranges(table.n_blocks)
        if accuracy.delta.shape != (len(ranges), table.n_levels):
            raise ConfigError(
                f"the accuracy model covers {accuracy.delta.shape}, the cost table "
                f"{len(ranges)} ranges x {table.n_levels} levels"
            )
        self.table, self.accuracy = table, accuracy
        self.exact_limit, self.max_stages = exact_limit, max_stages
        self.outage_factor = outage_factor
        self.stall_s = recovery_s**2 / (2.0 * horizon_s)
        self.population, self.generations = population, generations
        # real accuracy of (slice bounds, levels): a plan is kept only if it measures at least
        # floor + measured_margin (the margin covers the gap to data the veto has not seen);
        # after veto_tries distinct vetoed configurations the plan is None
        self.measured, self.measured_margin = measured, measured_margin
        self.veto_tries = veto_tries
        self._memo: dict[tuple[Any, ...], PlanResult] = {}  # plans are pure: reuse them

    def count(self, n_devices: int, n_levels: int | None = None) -> int:
        return configuration_count(
            self.table.n_blocks, n_devices, n_levels or self.table.n_levels, self.max_stages
        )

    def plan(
        self,
        devices: Sequence[Device],
        floor: float,
        *,
        objective: Objective = "bottleneck",
        slo_s: float | None = None,
        levels: Literal["any"] | int = "any",
        method: Method = "auto",
        seed: int = 0,
    ) -> PlanResult:
        """The best plan on ``devices`` (None when no configuration meets memory and the
        floor), with the front. ``levels=l`` forces every slice to level l (baselines)."""
        key = (tuple(devices), floor, objective, slo_s, levels, method, seed)
        if key in self._memo:
            return self._memo[key]
        if len(self._memo) > 4096:
            self._memo.clear()
        self._memo[key] = result = self._plan(
            devices, floor, objective, slo_s, levels, method, seed
        )
        return result

    def best_uniform(self, devices: Sequence[Device], floor: float) -> SlimPlan | None:
        """The strongest uniform baseline: of the plans with every slice at one level (each
        level's best), the one with the smallest bottleneck; None when no level fits."""
        plans = [
            b
            for lv in range(self.table.n_levels)
            if (b := self.plan(devices, floor, levels=lv).best)
        ]
        return min(plans, key=lambda b: b.bottleneck_s) if plans else None

    def _plan(
        self,
        devices: Sequence[Device],
        floor: float,
        objective: Objective,
        slo_s: float | None,
        levels: Literal["any"] | int,
        method: Method,
        seed: int,
    ) -> PlanResult:
        started = time.perf_counter()
        space = _Space(self.table, devices)
        count = self.count(len(devices), None if levels == "any" else 1)
        exposure = self._exposure(devices, floor) if objective == "expected" else None
        exact = (
            method == "exact" or levels != "any" or (method == "auto" and count <= self.exact_limit)
        )
        ev = (
            self._enumerate(space, exposure, levels)
            if exact
            else self._nsga(space, exposure, floor, seed)
        )
        accept = None
        if self.measured is not None:
            measured = self.measured

            def accept(i: int) -> bool:
                edges, _, lv = ev.decode(i)
                bounds = tuple(itertools.pairwise(edges))
                return measured(bounds, lv) >= floor + self.measured_margin - _TOL

        def config(i: int) -> Hashable:  # what the measured veto depends on: bounds and levels
            edges, _, lv = ev.decode(i)
            return edges, lv

        best, slo_met = _choose(ev, floor, slo_s, accept, self.veto_tries, config)
        ok = np.flatnonzero(ev.fits)
        front = ok[_front(ev.objective[ok], ev.accuracy[ok], ev.total[ok])]

        def to_plan(i: int) -> SlimPlan:
            return space.plan(
                ev.decode(i),
                float(ev.bottleneck[i]),
                float(ev.total[i]),
                float(ev.objective[i]),
                float(ev.accuracy[i]),
            )

        meta: dict[str, Any] = {
            "devices": [d.name for d in devices],
            "floor": floor,
            "slo_s": slo_s,
        }
        if exposure is not None:
            meta["failure_weights"] = exposure[0].tolist()
            meta["replanned_bottleneck_s"] = exposure[1].tolist()
        return PlanResult(
            None if best is None else to_plan(best),
            tuple(to_plan(int(i)) for i in front),
            "exact" if exact else "nsga2",
            count,
            len(ev.stages),
            time.perf_counter() - started,
            objective,
            slo_met,
            meta,
        )

    def _exposure(
        self, devices: Sequence[Device], floor: float
    ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """``(q_k, B*_k)`` for the expected objective."""
        q = failure_weights(devices)
        base = self.plan(devices, floor).best
        outage = self.outage_factor * (base.bottleneck_s if base else 1.0)
        after = np.full(len(devices), outage)
        for k in range(len(devices)):
            if q[k] > 0 and len(devices) > 1:
                b = self.plan([d for i, d in enumerate(devices) if i != k], floor).best
                after[k] = b.bottleneck_s if b else outage
        return q, after

    def _max_stages(self, m: int) -> int:
        return min(self.table.n_blocks, m, self.max_stages or m)

    def _objective(
        self,
        bottleneck: NDArray[np.float64],
        devs: NDArray[np.intp],
        exposure: tuple[NDArray[np.float64], NDArray[np.float64]] | None,
    ) -> NDArray[np.float64]:
        """Bottleneck, or the expected bottleneck of plans using ``devs`` (``[..., s]``)."""
        if exposure is None:
            return bottleneck
        q, after = exposure
        return bottleneck * (1.0 - 0.5 * q[devs].sum(-1)) + (q * (0.5 * after + self.stall_s))[
            devs
        ].sum(-1)

    def _enumerate(self, space: _Space, exposure: Any, levels: Literal["any"] | int) -> _Evaluated:
        n, m, n_levels = self.table.n_blocks, len(space.devices), self.table.n_levels
        blocks: list[tuple[int, list[tuple[int, ...]], NDArray[np.intp], NDArray[np.intp]]] = []
        cols: list[list[NDArray[Any]]] = [[], [], [], [], [], []]
        offset = 0
        for s in range(1, self._max_stages(m) + 1):
            edges = [(0, *c, n) for c in itertools.combinations(range(1, n), s - 1)]
            parts = np.asarray([[space.index[(e[t], e[t + 1])] for t in range(s)] for e in edges])
            devs = np.asarray(list(itertools.combinations(range(m), s)))
            lev = (
                np.asarray(list(itertools.product(range(n_levels), repeat=s)))
                if levels == "any"
                else np.full((1, s), int(levels))
            )
            ix = (devs[None, :, None, :], parts[:, None, None, :], lev[None, None, :, :])
            stage, fits = space.stage[ix], space.fits[ix].all(-1)  # [P, D, Q(, s)]
            bott = stage.max(-1)
            shape = bott.shape
            acc = self.accuracy.predict(
                np.broadcast_to(parts[:, None, :], (*shape[::2], s)),
                np.broadcast_to(lev[None], (*shape[::2], s)),
            )
            obj = self._objective(
                bott, np.broadcast_to(devs[None, :, None, :], (*shape, s)), exposure
            )
            for col, arr in zip(
                cols,
                (
                    obj,
                    bott,
                    stage.sum(-1),
                    np.broadcast_to(acc[:, None, :], shape),
                    fits,
                    np.full(shape, s),
                ),
                strict=True,
            ):
                col.append(np.asarray(arr).ravel())
            blocks.append((offset, edges, devs, lev))
            offset += bott.size
        starts = [b[0] for b in blocks]

        def decode(i: int) -> Key:
            off, edges, devs, lev = blocks[bisect.bisect_right(starts, i) - 1]
            p, d, q = np.unravel_index(i - off, (len(edges), len(devs), len(lev)))
            return edges[p], tuple(int(v) for v in devs[d]), tuple(int(v) for v in lev[q])

        obj, bott, total, acc, fits, stages = (np.concatenate(c) for c in cols)
        return _Evaluated(decode, stages, obj, bott, total, acc, fits.astype(bool))

    # ------------------------------------------------------------------------- NSGA-II
    def _nsga(self, space: _Space, exposure: Any, floor: float, seed: int) -> _Evaluated:
        rng = np.random.default_rng(seed)
        n, m, n_levels = self.table.n_blocks, len(space.devices), self.table.n_levels
        top, size = self._max_stages(m), self.population
        cache: dict[tuple[Any, ...], tuple[float, ...]] = {}

        def score(key: Key) -> tuple[float, ...]:
            """(objective, bottleneck, total, accuracy, memory overflow, violation)."""
            if key not in cache:
                edges, devs, levels = key
                r = [space.index[(edges[t], edges[t + 1])] for t in range(len(devs))]
                stage = space.stage[list(devs), r, list(levels)]
                over = float(space.overflow[list(devs), r, list(levels)].sum())
                acc = self.accuracy.predict_one(r, levels)
                b = float(stage.max())
                obj = float(self._objective(np.asarray(b), np.asarray(devs), exposure))
                cache[key] = (obj, b, float(stage.sum()), acc, over, over + max(0.0, floor - acc))
            return cache[key]

        def evaluate(
            cuts: NDArray[np.bool_], keys: NDArray[np.float64], lev: NDArray[np.intp]
        ) -> tuple[float, float, float]:
            on = np.flatnonzero(cuts)
            if len(on) + 1 > top:  # repair: too many stages for the devices
                cuts[rng.choice(on, len(on) + 1 - top, replace=False)] = False
            edges = (0, *(int(c) + 1 for c in np.flatnonzero(cuts)), n)
            s = len(edges) - 1
            devs = tuple(sorted(int(k) for k in np.argsort(keys, kind="stable")[:s]))
            obj, _, _, acc, _, cv = score((edges, devs, tuple(int(lev[e]) for e in edges[:-1])))
            return obj, -acc, cv

        cuts = rng.random((size, n - 1)) < 0.5
        keys = rng.random((size, m))
        lev = rng.integers(0, n_levels, (size, n))
        for level in range(min(n_levels, size)):  # seeds: the best placement per uniform level
            uniform = self._enumerate(space, None, level)
            i = _choose(uniform, -math.inf, None)[0]
            if i is not None:
                edges, devs, _ = uniform.decode(i)
                cuts[level] = [b + 1 in edges for b in range(n - 1)]
                keys[level] = [0.0 if k in devs else 1.0 for k in range(m)]
                lev[level] = level
        fit = np.asarray([evaluate(cuts[i], keys[i], lev[i]) for i in range(size)])
        for _ in range(self.generations):
            rank, crowd = _rank_crowd(fit)
            a, b = rng.integers(0, size, (2, size))
            win = np.where(
                (rank[a] < rank[b]) | ((rank[a] == rank[b]) & (crowd[a] > crowd[b])), a, b
            )
            mates = np.roll(win, 1)
            swap_c = rng.random((size, n - 1)) < 0.5
            swap_k = rng.random((size, m)) < 0.5
            swap_l = rng.random((size, n)) < 0.5
            c_cuts = np.where(swap_c, cuts[mates], cuts[win])
            c_keys = np.where(swap_k, keys[mates], keys[win])
            c_lev = np.where(swap_l, lev[mates], lev[win])
            c_cuts ^= rng.random(c_cuts.shape) < 1.0 / max(1, n - 1)
            c_keys = np.where(rng.random(c_keys.shape) < 1.0 / m, rng.random(c_keys.shape), c_keys)
            step = rng.choice([-1, 1], c_lev.shape) * (rng.random(c_lev.shape) < 1.0 / n)
            c_lev = np.clip(c_lev + step, 0, n_levels - 1)
            c_fit = np.asarray([evaluate(c_cuts[i], c_keys[i], c_lev[i]) for i in range(size)])
            cuts, keys = np.concatenate([cuts, c_cuts]), np.concatenate([keys, c_keys])
            lev, fit = np.concatenate([lev, c_lev]), np.concatenate([fit, c_fit])
            rank, crowd = _rank_crowd(fit)
            keep = np.lexsort((-crowd, rank))[:size]
            cuts, keys, lev, fit = cuts[keep], keys[keep], lev[keep], fit[keep]

        # polish: hill-climb from the best configuration over one-step neighbours
        def order(key: Key) -> tuple[Any, ...]:
            obj, _, total, acc, _, cv = score(key)
            return (cv > 0, cv, obj, -acc, total)

        best, improved = min(cache, key=order), True
        while improved:
            improved = False
            for cand in _neighbours(best, m, n_levels):
                if order(cand) < order(best):
                    best, improved = cand, True
        ks = list(cache)
        vals = np.asarray([cache[k] for k in ks])
        return _Evaluated(
            lambda i: ks[i],
            np.asarray([len(k[1]) for k in ks]),
            vals[:, 0],
            vals[:, 1],
            vals[:, 2],
            vals[:, 3],
            vals[:, 4] <= 0,
        )


def _neighbours(key: Key, m: int, n_levels: int) -> list[Key]:
    """One stage's level +-1, one cut moved by one block, one stage on another device."""
    edges, devs, levels = key
    s, out = len(devs), []
    for t in range(s):
        out += [
            (edges, devs, (*levels[:t], levels[t] + d, *levels[t + 1 :]))
            for d in (-1, 1)
            if 0 <= levels[t] + d < n_levels
        ]
        lo, hi = (devs[t - 1] + 1 if t else 0), (devs[t + 1] if t + 1 < s else m)
        out += [
            (edges, (*devs[:t], k, *devs[t + 1 :]), levels) for k in range(lo, hi) if k != devs[t]
        ]
        if t:
            out += [
                ((*edges[:t], edges[t] + d, *edges[t + 1 :]), devs, levels)
                for d in (-1, 1)
                if edges[t - 1] < edges[t] + d < edges[t + 1]
            ]
    return out


def _rank_crowd(fit: NDArray[np.float64]) -> tuple[NDArray[np.intp], NDArray[np.float64]]:
    """Non-domination rank under constraint domination (Deb) and crowding distance.
    ``fit[:, :2]`` are objectives to minimise, ``fit[:, 2]`` the constraint violation."""
    f, cv = fit[:, :2], fit[:, 2]
    feas = cv <= 0
    better = (f[:, None, :] <= f[None, :, :]).all(-1) & (f[:, None, :] < f[None, :, :]).any(-1)
    dom = (
        (feas[:, None] & feas[None, :] & better)
        | (feas[:, None] & ~feas[None, :])
        | (~feas[:, None] & ~feas[None, :] & (cv[:, None] < cv[None, :]))
    )
    rank = np.full(len(f), -1)
    count = dom.sum(0)
    r = 0
    while (rank < 0).any():
        now = np.flatnonzero((count == 0) & (rank < 0))
        rank[now] = r
        count = count - dom[now].sum(0)
        count[now] = -1
        r += 1
    crowd = np.zeros(len(f))
    for level in range(r):
        idx = np.flatnonzero(rank == level)
        for j in range(2):
            order = idx[np.argsort(f[idx, j], kind="stable")]
            span = f[order[-1], j] - f[order[0], j]
            crowd[order[0]] = crowd[order[-1]] = np.inf
            if len(order) > 2 and span > 0:
                crowd[order[1:-1]] += (f[order[2:], j] - f[order[:-2], j]) / span
    return rank, crowd


def _choose(
    ev: _Evaluated,
    floor: float,
    slo_s: float | None,
    accept: Callable[[int], bool] | None = None,
    tries: int = 25,
    config: Callable[[int], Hashable] | None = None,
) -> tuple[int | None, bool | None]:
    """Index of the best configuration (module docstring) and whether the SLO is met.
    ``accept`` (the measured-accuracy check) may veto candidates, at most ``tries`` distinct
    ones: a candidate whose ``config`` (what the check depends on) was vetoed is skipped."""
    ok = np.flatnonzero(ev.fits & (ev.accuracy >= floor - _TOL))
    stages = ev.stages[ok]
    within = (
        np.zeros(len(ok), dtype=bool) if slo_s is None else ev.objective[ok] <= slo_s * (1 + 1e-9)
    )
    # SLO met first (most accurate, then fastest); then the fastest
    order = ok[
        np.lexsort(
            (
                stages,
                ev.total[ok],
                np.where(within, ev.objective[ok], 0.0),
                -np.where(within, ev.accuracy[ok], 0.0),
                ev.objective[ok] * ~within,
                ~within,
            )
        )
    ]
    vetoed: set[Hashable] = set()
    for i in order if accept is not None else order[:1]:
        key = config(int(i)) if config is not None else int(i)
        if key in vetoed:
            continue
        if accept is None or accept(int(i)):
            return int(i), None if slo_s is None else bool(within[np.searchsorted(ok, i)])
        vetoed.add(key)
        if len(vetoed) >= tries:
            break
    return None, None if slo_s is None else False


def _front(
    obj: NDArray[np.float64], acc: NDArray[np.float64], total: NDArray[np.float64]
) -> NDArray[np.intp]:
    """Indices of the non-dominated points (lower objective, higher accuracy), fastest first."""
    order = np.lexsort((total, -acc, obj))
    best = np.maximum.accumulate(np.concatenate([[-np.inf], acc[order][:-1]]))
    return np.asarray(order[acc[order] > best + _TOL])
