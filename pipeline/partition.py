"""Placing contiguous block ranges of a model on an ordered list of devices.

A model is a chain of blocks. A :class:`Partition` cuts it into stages ``[start, end)`` and
runs stage k on a device (a :class:`~pipeline.placement.Placement`, node id = device name);
devices (:class:`~pipeline.devices.Device`) are used in the given order and may be skipped, so
a partition can have fewer stages than there are devices. The cost of a stage on device D is::

    compute(range) / D.speed  +  output_bytes(range) * 8 / D.bandwidth + D.latency

where ``D.speed`` is the device's ``speed``, or with its own profile the ratio of the two
profiles' total block times (:meth:`~pipeline.devices.Device.relative_speed`),and the transfer term (sending the range's output tensor to the next stage over D's link) is
absent for the last stage. A range fits on D when ``sum(param_bytes) + max(activation_bytes)``
over its blocks is at most D's memory (weights stay resident, activations are freed block by
block, so the peak is the largest block's). Units: ``memory_mb`` is MiB (2^20 bytes),
``bandwidth_mbps`` is 10^6 bits per second, ``latency_ms`` milliseconds.

:func:`partition` minimises the slowest stage (pipeline throughput is ``1 / bottleneck``) by
dynamic programming, and among partitions with that bottleneck picks the one with the smallest
total (end-to-end) time, by a second programme restricted to stages no slower than the
bottleneck; both are exact (:func:`exhaustive_partition` is the brute-force reference).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.devices import MIB, Device, check_unique_names, finite_number
from pipeline.errors import ConfigError
from pipeline.placement import Placement, SliceBounds, StagePlacement

PLAN_SCHEMA = 1


@dataclass(frozen=True)
class BlockProfile:
    """One block measured on the reference machine: time, memory, and the tensor it emits."""

    name: str
    compute_s: float
    param_bytes: int
    activation_bytes: int
    output_bytes: int

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"block name must be a non-empty string, got {self.name!r}")
        finite_number(self.compute_s, f"block {self.name!r} compute_s", minimum=0.0)
        for key in ("param_bytes", "activation_bytes", "output_bytes"):
            finite_number(getattr(self, key), f"block {self.name!r} {key}", minimum=0.0)


@dataclass(frozen=True)
class Partition:
    """A model cut into stages placed on devices, with what the cost model predicts.

    ``stage_s`` is the predicted time of every stage (None when unknown, as for
    :func:`uniform_partition`). ``version`` is bumped by whoever publishes a replacement;
    ``created_by`` says which function made it (``"partition"``, ``"uniform"``,
    ``"balanced"``, ...). Its JSON (``edgeprune partition --out``) is the "plan JSON" that
    ``edgeprune calibrate --plan`` reads.
    """

    placement: Placement
    stage_s: tuple[float, ...] | None = None
    bottleneck_s: float | None = None
    version: int = 1
    created_by: str = "partition"

    def __post_init__(self) -> None:
        if self.stage_s is not None:
            if len(self.stage_s) != len(self.placement.stages):
                raise ConfigError(
                    f"{len(self.stage_s)} stage times for {len(self.placement.stages)} stages"
                )
            for t in self.stage_s:
                finite_number(t, "stage predicted_s", minimum=0.0)
        if isinstance(self.version, bool) or not isinstance(self.version, int) or self.version < 1:
            raise ConfigError(f"plan version must be a positive integer, got {self.version!r}")
        if self.bottleneck_s is not None:
            finite_number(self.bottleneck_s, "plan bottleneck_s", minimum=0.0)

    def to_dict(self) -> dict[str, Any]:
        times: Sequence[float | None] = self.stage_s or [None] * len(self.placement.stages)
        return {
            "schema": PLAN_SCHEMA,
            "version": self.version,
            "created_by": self.created_by,
            "bottleneck_s": self.bottleneck_s,
            "hash": self.placement.placement_hash(),
            "stages": [
                {
                    "start_block": s.bounds.start,
                    "end_block": s.bounds.end,
                    "device": s.node,
                    "predicted_s": t,
                }
                for s, t in zip(self.placement.stages, times, strict=True)
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Partition:
        if not isinstance(data, Mapping):
            raise ConfigError(f"a plan must be an object, got {type(data).__name__}")
        if data.get("schema") != PLAN_SCHEMA:
            raise ConfigError(
                f"unknown plan schema {data.get('schema')!r} (expected {PLAN_SCHEMA})"
            )
        stages = data.get("stages")
        if not isinstance(stages, list) or not all(isinstance(s, Mapping) for s in stages):
            raise ConfigError("a plan needs a 'stages' list of objects")
        keys = {"start_block", "end_block", "device", "predicted_s"}
        for s in stages:
            if set(s) - keys or not {"start_block", "end_block", "device"} <= set(s):
                raise ConfigError(f"malformed plan stage {dict(s)} (keys: {sorted(keys)})")
        times = [s.get("predicted_s") for s in stages]
        if any(t is None for t in times) and any(t is not None for t in times):
            raise ConfigError("a plan gives predicted_s for every stage or for none")
        try:
            placement = Placement(
                tuple(
                    StagePlacement(SliceBounds(s["start_block"], s["end_block"]), s["device"])
                    for s in stages
                )
            )
        except TypeError as exc:  # a bound that is not a number
            raise ConfigError(f"malformed plan stage: {exc}") from exc
        plan = cls(
            placement=placement,
            stage_s=None if not stages or times[0] is None else tuple(times),
            bottleneck_s=data.get("bottleneck_s"),
            version=data.get("version", 1),
            created_by=str(data.get("created_by", "")),
        )
        if "hash" in data and data["hash"] != placement.placement_hash():
            raise ConfigError(
                f"plan hash mismatch: file says {data['hash']!r}, stages give "
                f"{placement.placement_hash()!r}"
            )
        return plan


class _Costs:
    """Stage costs ``cost(k, i, j)`` of blocks ``[i, j)`` on device k (inf when it does not fit)."""

    def __init__(self, profile: Sequence[BlockProfile], devices: Sequence[Device]) -> None:
        if not profile:
            raise ConfigError("the profile has no blocks")
        if not devices:
            raise ConfigError("no devices to place the model on")
        check_unique_names(devices)
        self.profile = profile
        self.devices = devices
        names, times = [b.name for b in profile], [b.compute_s for b in profile]
        self.speeds = [d.relative_speed(names, times) for d in devices]
        self.n = len(profile)
        self.compute = list(itertools.accumulate((b.compute_s for b in profile), initial=0.0))
        params = list(itertools.accumulate((b.param_bytes for b in profile), initial=0))
        # mem[i][j - i - 1]: bytes needed by blocks [i, j) (running max of the activations)
        self._mem: list[list[float]] = []
        for i in range(self.n):
            peak: float = 0.0
            row: list[float] = []
            for j in range(i + 1, self.n + 1):
                peak = max(peak, profile[j - 1].activation_bytes)
                row.append(params[j] - params[i] + peak)
            self._mem.append(row)

    def memory(self, i: int, j: int) -> float:
        """Parameters of blocks ``[i, j)`` plus their largest activation, in bytes."""
        return self._mem[i][j - i - 1]

    def __call__(self, k: int, i: int, j: int) -> float:
        dev = self.devices[k]
        if self.memory(i, j) > dev.memory_bytes:
            return math.inf
        t = (self.compute[j] - self.compute[i]) / self.speeds[k]
        if j < self.n:
            t += dev.transfer_s(self.profile[j - 1].output_bytes)
        return t

    def infeasible(self) -> ConfigError:
        need = max(b.param_bytes + b.activation_bytes for b in self.profile) / MIB
        total = self.memory(0, self.n) / MIB
        largest = max(self.devices, key=lambda d: d.memory_mb)
        return ConfigError(
            f"no placement of {self.n} blocks on {len(self.devices)} devices fits in memory: "
            f"the whole model needs {total:.1f} MiB, the largest single block {need:.1f} MiB, "
            f"and the largest device ({largest.name}) has {largest.memory_mb:.1f} MiB; "
            f"add devices, use ones with more memory, or allow more stages"
        )


def _partition(
    costs: _Costs, ranges: Sequence[tuple[int, int, int]], created_by: str, version: int
) -> Partition:
    placement = Placement(
        tuple(StagePlacement(SliceBounds(i, j), costs.devices[k].name) for k, i, j in ranges)
    )
    times = tuple(costs(k, i, j) for k, i, j in ranges)
    return Partition(placement, times, max(times), version, created_by)


def _max_stages(max_stages: int | None, n: int, m: int) -> int:
    if max_stages is not None and (isinstance(max_stages, bool) or max_stages < 1):
        raise ConfigError(f"max_stages must be a positive integer, got {max_stages!r}")
    return min(n, m, max_stages or m)


def partition(
    profile: Sequence[BlockProfile],
    devices: Sequence[Device],
    max_stages: int | None = None,
    *,
    version: int = 1,
) -> Partition:
    """The partition with the smallest bottleneck stage, then the smallest total time (exact DP).

    Raises :class:`ConfigError` when no assignment fits the devices' memory.
    """
    costs = _Costs(profile, devices)
    n, m = costs.n, len(devices)
    n_stages = _max_stages(max_stages, n, m)
    cost = [
        [[costs(k, i, j) if i < j else math.inf for j in range(n + 1)] for i in range(n + 1)]
        for k in range(m)
    ]
    inf = math.inf

    # Phase 1. best[s][k][j]: smallest bottleneck covering blocks [0, j) with s stages on
    # devices chosen (in order) among the first k.
    best = [
        [[0.0 if (s == 0 and j == 0) else inf for j in range(n + 1)] for _ in range(m + 1)]
        for s in range(n_stages + 1)
    ]
    for s in range(1, n_stages + 1):
        for k in range(m):
            prev, row, here = best[s - 1][k], best[s][k], best[s][k + 1]
            for j in range(1, n + 1):
                v = row[j]  # device k skipped
                for i in range(j):
                    c = max(prev[i], cost[k][i][j])
                    if c < v:
                        v = c
                here[j] = v
    bottleneck = min(best[s][m][n] for s in range(1, n_stages + 1))
    if bottleneck == inf:
        raise costs.infeasible()

    # Phase 2. total[s][k][j]: smallest total time under the same indexing, using only stages
    # no slower than the bottleneck; back-pointers rebuild the partition.
    limit = bottleneck * (1 + 1e-12) + 1e-15
    total = [
        [[0.0 if (s == 0 and j == 0) else inf for j in range(n + 1)] for _ in range(m + 1)]
        for s in range(n_stages + 1)
    ]
    back: dict[tuple[int, int, int], tuple[int, int] | None] = {}
    for s in range(1, n_stages + 1):
        for k in range(m):
            prev, row, here = total[s - 1][k], total[s][k], total[s][k + 1]
            for j in range(1, n + 1):
                v, arg = row[j], None
                for i in range(j):
                    c = cost[k][i][j]
                    if c <= limit and prev[i] + c < v:
                        v, arg = prev[i] + c, (k, i)
                here[j] = v
                back[(s, k + 1, j)] = arg
    s = min(range(1, n_stages + 1), key=lambda s: total[s][m][n])
    ranges: list[tuple[int, int, int]] = []
    k, j = m, n
    while s > 0:
        arg = back[(s, k, j)]
        if arg is None:  # device k - 1 was skipped
            k -= 1
            continue
        dev, i = arg
        ranges.append((dev, i, j))
        s, k, j = s - 1, dev, i
    return _partition(costs, ranges[::-1], "partition", version)


def exhaustive_partition(
    profile: Sequence[BlockProfile], devices: Sequence[Device], max_stages: int | None = None
) -> Partition:
    """Brute force over every cut and every ordered choice of devices (the test reference)."""
    costs = _Costs(profile, devices)
    n, m = costs.n, len(devices)
    best_key, best_ranges = (math.inf, math.inf), None
    for s in range(1, _max_stages(max_stages, n, m) + 1):
        for cuts in itertools.combinations(range(1, n), s - 1):
            edges = (0, *cuts, n)
            for devs in itertools.combinations(range(m), s):
                ranges = [(k, edges[t], edges[t + 1]) for t, k in enumerate(devs)]
                times = [costs(k, i, j) for k, i, j in ranges]
                key = (max(times), sum(times))
                if key < best_key:
                    best_key, best_ranges = key, ranges
    if best_ranges is None or best_key[0] == math.inf:
        raise costs.infeasible()
    return _partition(costs, best_ranges, "exhaustive", 1)


def _default_names(n_stages: int, devices: Sequence[str] | None) -> list[str]:
    if devices is None:
        return [f"node{k}" for k in range(n_stages)]
    if len(devices) != n_stages:
        raise ConfigError(f"{n_stages} stages but {len(devices)} device names")
    return list(devices)


def uniform_partition(
    n_blocks: int, n_stages: int, devices: Sequence[str] | None = None
) -> Partition:
    """(Nearly) the same number of blocks per stage; no predicted times. Devices default to
    ``node0, node1, ...``."""
    if not 1 <= n_stages <= n_blocks:
        raise ConfigError(f"cannot split {n_blocks} blocks into {n_stages} stages")
    names = _default_names(n_stages, devices)
    edges = [round(k * n_blocks / n_stages) for k in range(n_stages + 1)]
    bounds = [SliceBounds(edges[k], edges[k + 1]) for k in range(n_stages)]
    return Partition(Placement.build(bounds, names), created_by="uniform")


def balanced_partition(
    block_times: Sequence[float], n_stages: int, devices: Sequence[str] | None = None
) -> Partition:
    """Exactly ``n_stages`` contiguous stages on identical devices with free transfers,
    minimising the slowest stage's total block time (ties broken deterministically)."""
    times = [finite_number(t, "block time", minimum=0.0) for t in block_times]
    n = len(times)
    if not 1 <= n_stages <= n:
        raise ConfigError(f"cannot split {n} blocks into {n_stages} stages")
    names = _default_names(n_stages, devices)
    pre = list(itertools.accumulate(times, initial=0.0))
    # best[s][j]: smallest bottleneck covering [0, j) with exactly s stages.
    best = [[math.inf] * (n + 1) for _ in range(n_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(n_stages + 1)]
    best[0][0] = 0.0
    for s in range(1, n_stages + 1):
        for j in range(s, n + 1):
            for i in range(s - 1, j):
                c = max(best[s - 1][i], pre[j] - pre[i])
                if c < best[s][j]:
                    best[s][j], cut[s][j] = c, i
    edges = [n]
    for s in range(n_stages, 0, -1):
        edges.append(cut[s][edges[-1]])
    edges.reverse()
    bounds = [SliceBounds(edges[k], edges[k + 1]) for k in range(n_stages)]
    return Partition(
        Placement.build(bounds, names),
        tuple(pre[b.end] - pre[b.start] for b in bounds),
        best[n_stages][n],
        created_by="balanced",
    )
