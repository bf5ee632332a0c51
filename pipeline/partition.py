"""Placing contiguous block ranges of a model on an ordered list of devices.

A model is a chain of blocks. A :class:`Plan` cuts it into stages ``[start, end)`` and runs
stage k on a device; devices are used in the given order and may be skipped, so a plan can
have fewer stages than there are devices. The cost of a stage on device D is::

    compute(range) / D.speed  +  output_bytes(range) * 8 / D.bandwidth + D.latency

where the transfer term (sending the range's output tensor to the next stage over D's link) is
absent for the last stage. A range fits on D when ``sum(param_bytes) + max(activation_bytes)``
over its blocks is at most D's memory (weights stay resident, activations are freed block by
block, so the peak is the largest block's). Units: ``memory_mb`` is MiB (2^20 bytes),
``bandwidth_mbps`` is 10^6 bits per second, ``latency_ms`` milliseconds.

:func:`partition` minimises the slowest stage (pipeline throughput is ``1 / bottleneck``) by
dynamic programming, and among plans with that bottleneck picks the one with the smallest
total (end-to-end) time, by a second programme restricted to stages no slower than the
bottleneck; both are exact (:func:`exhaustive_partition` is the brute-force reference).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError

PLAN_SCHEMA = 1
MIB = 1 << 20


def _number(
    value: Any,
    what: str,
    *,
    minimum: float | None = None,
    positive: bool = False,
    below: float | None = None,
) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{what} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ConfigError(f"{what} must be > 0, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{what} must be >= {minimum}, got {value!r}")
    if below is not None and value >= below:
        raise ConfigError(f"{what} must be < {below}, got {value!r}")
    return float(value)


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
        _number(self.compute_s, f"block {self.name!r} compute_s", minimum=0.0)
        for key in ("param_bytes", "activation_bytes", "output_bytes"):
            _number(getattr(self, key), f"block {self.name!r} {key}", minimum=0.0)


@dataclass(frozen=True)
class Device:
    """A device: ``speed`` relative to the reference machine (2.0 = twice as fast)."""

    name: str
    speed: float
    memory_mb: float
    bandwidth_mbps: float
    latency_ms: float
    failure_prob: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"device name must be a non-empty string, got {self.name!r}")
        where = f"device {self.name!r}"
        _number(self.speed, f"{where} speed", positive=True)
        _number(self.memory_mb, f"{where} memory_mb", positive=True)
        _number(self.bandwidth_mbps, f"{where} bandwidth_mbps", positive=True)
        _number(self.latency_ms, f"{where} latency_ms", minimum=0.0)
        _number(self.failure_prob, f"{where} failure_prob", minimum=0.0, below=1.0)

    @property
    def memory_bytes(self) -> float:
        return self.memory_mb * MIB

    def transfer_s(self, nbytes: float) -> float:
        """Time to send ``nbytes`` to the next device over this device's link."""
        return nbytes * 8.0 / (self.bandwidth_mbps * 1e6) + self.latency_ms / 1000.0

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Device:
        if not isinstance(data, Mapping):
            raise ConfigError(f"a device must be a table, got {data!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"device {data.get('name', '?')!r}: unknown keys {unknown}")
        missing = sorted(k for k in known - {"failure_prob"} if k not in data)
        if missing:
            raise ConfigError(f"device {data.get('name', '?')!r}: missing keys {missing}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def devices_from_toml(text: str, source: str = "<string>") -> tuple[Device, ...]:
    """Devices from TOML with one ``[[device]]`` table per device, in pipeline order."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
    unknown = sorted(set(doc) - {"device"})
    if unknown:
        raise ConfigError(f"{source}: unknown top-level keys {unknown} (expected [[device]])")
    tables = doc.get("device")
    if not isinstance(tables, list) or not tables:
        raise ConfigError(f"{source}: no [[device]] tables")
    devices = tuple(Device.from_dict(t) for t in tables)
    names = [d.name for d in devices]
    if len(set(names)) != len(names):
        raise ConfigError(f"{source}: duplicate device names in {names}")
    return devices


def load_devices(path: str | Path) -> tuple[Device, ...]:
    """:func:`devices_from_toml` on a file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read device file {p}: {exc}") from exc
    return devices_from_toml(text, source=str(p))


@dataclass(frozen=True)
class StagePlan:
    """Blocks ``[start_block, end_block)`` on ``device``; ``predicted_s`` is None if unknown."""

    start_block: int
    end_block: int
    device: str
    predicted_s: float | None = None

    def __post_init__(self) -> None:
        for key in ("start_block", "end_block"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ConfigError(f"stage {key} must be an integer, got {v!r}")
        if self.start_block < 0 or self.end_block <= self.start_block:
            raise ConfigError(f"bad stage bounds [{self.start_block}, {self.end_block})")
        if not isinstance(self.device, str) or not self.device:
            raise ConfigError(f"stage device must be a non-empty string, got {self.device!r}")
        if self.predicted_s is not None:
            _number(self.predicted_s, "stage predicted_s", minimum=0.0)


@dataclass(frozen=True)
class Plan:
    """Which device runs which contiguous block range, in pipeline order.

    ``version`` is bumped by whoever publishes a replacement plan; ``created_by`` says which
    planner made it (``"partition"``, ``"uniform"``, ``"balanced"``, ...).
    """

    stages: tuple[StagePlan, ...]
    bottleneck_s: float | None = None
    version: int = 1
    created_by: str = "partition"

    def __post_init__(self) -> None:
        if not self.stages:
            raise ConfigError("a plan needs at least one stage")
        if self.stages[0].start_block != 0:
            raise ConfigError("the first stage must start at block 0")
        for prev, nxt in itertools.pairwise(self.stages):
            if nxt.start_block != prev.end_block:
                raise ConfigError(
                    f"stages must be contiguous: [{prev.start_block}, "
                    f"{prev.end_block}) then [{nxt.start_block}, {nxt.end_block})"
                )
        names = [s.device for s in self.stages]
        if len(set(names)) != len(names):
            raise ConfigError(f"a device may run only one stage, got {names}")
        if isinstance(self.version, bool) or not isinstance(self.version, int) or self.version < 1:
            raise ConfigError(f"plan version must be a positive integer, got {self.version!r}")
        if self.bottleneck_s is not None:
            _number(self.bottleneck_s, "plan bottleneck_s", minimum=0.0)

    @property
    def n_blocks(self) -> int:
        return self.stages[-1].end_block

    @property
    def devices(self) -> tuple[str, ...]:
        return tuple(s.device for s in self.stages)

    def plan_hash(self) -> str:
        """A short hash of the placement only (bounds and devices, not times or version)."""
        key = [[s.start_block, s.end_block, s.device] for s in self.stages]
        return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": PLAN_SCHEMA,
            "version": self.version,
            "created_by": self.created_by,
            "bottleneck_s": self.bottleneck_s,
            "hash": self.plan_hash(),
            "stages": [
                {
                    "start_block": s.start_block,
                    "end_block": s.end_block,
                    "device": s.device,
                    "predicted_s": s.predicted_s,
                }
                for s in self.stages
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        if not isinstance(data, Mapping):
            raise ConfigError(f"a plan must be an object, got {type(data).__name__}")
        if data.get("schema") != PLAN_SCHEMA:
            raise ConfigError(
                f"unknown plan schema {data.get('schema')!r} (expected {PLAN_SCHEMA})"
            )
        stages = data.get("stages")
        if not isinstance(stages, list):
            raise ConfigError("a plan needs a 'stages' list")
        try:
            plan = cls(
                stages=tuple(StagePlan(**s) for s in stages),
                bottleneck_s=data.get("bottleneck_s"),
                version=data.get("version", 1),
                created_by=str(data.get("created_by", "")),
            )
        except TypeError as exc:
            raise ConfigError(f"malformed plan stage: {exc}") from exc
        if "hash" in data and data["hash"] != plan.plan_hash():
            raise ConfigError(
                f"plan hash mismatch: file says {data['hash']!r}, stages give {plan.plan_hash()!r}"
            )
        return plan


class _Costs:
    """Stage costs ``cost(k, i, j)`` of blocks ``[i, j)`` on device k (inf when it does not fit)."""

    def __init__(self, profile: Sequence[BlockProfile], devices: Sequence[Device]) -> None:
        if not profile:
            raise ConfigError("the profile has no blocks")
        if not devices:
            raise ConfigError("no devices to place the model on")
        names = [d.name for d in devices]
        if len(set(names)) != len(names):
            raise ConfigError(f"duplicate device names in {names}")
        self.profile = profile
        self.devices = devices
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
        t = (self.compute[j] - self.compute[i]) / dev.speed
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


def _plan(
    costs: _Costs, ranges: Sequence[tuple[int, int, int]], created_by: str, version: int
) -> Plan:
    stages = tuple(StagePlan(i, j, costs.devices[k].name, costs(k, i, j)) for k, i, j in ranges)
    return Plan(
        stages=stages,
        bottleneck_s=max(s.predicted_s or 0.0 for s in stages),
        version=version,
        created_by=created_by,
    )


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
) -> Plan:
    """The plan with the smallest bottleneck stage, then the smallest total time (exact DP).

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
    # no slower than the bottleneck; back-pointers rebuild the plan.
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
    return _plan(costs, ranges[::-1], "partition", version)


def exhaustive_partition(
    profile: Sequence[BlockProfile], devices: Sequence[Device], max_stages: int | None = None
) -> Plan:
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
    return _plan(costs, best_ranges, "exhaustive", 1)


def _default_names(n_stages: int, devices: Sequence[str] | None) -> list[str]:
    if devices is None:
        return [f"node{k}" for k in range(n_stages)]
    if len(devices) != n_stages:
        raise ConfigError(f"{n_stages} stages but {len(devices)} device names")
    return list(devices)


def uniform_plan(n_blocks: int, n_stages: int, devices: Sequence[str] | None = None) -> Plan:
    """(Nearly) the same number of blocks per stage; no predicted times. Devices default to
    ``node0, node1, ...``."""
    if not 1 <= n_stages <= n_blocks:
        raise ConfigError(f"cannot split {n_blocks} blocks into {n_stages} stages")
    names = _default_names(n_stages, devices)
    edges = [round(k * n_blocks / n_stages) for k in range(n_stages + 1)]
    return Plan(
        stages=tuple(StagePlan(edges[k], edges[k + 1], names[k]) for k in range(n_stages)),
        created_by="uniform",
    )


def balanced_plan(
    block_times: Sequence[float], n_stages: int, devices: Sequence[str] | None = None
) -> Plan:
    """Exactly ``n_stages`` contiguous stages on identical devices with free transfers,
    minimising the slowest stage's total block time (ties broken deterministically)."""
    times = [_number(t, "block time", minimum=0.0) for t in block_times]
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
    stages = tuple(
        StagePlan(edges[k], edges[k + 1], names[k], pre[edges[k + 1]] - pre[edges[k]])
        for k in range(n_stages)
    )
    return Plan(stages=stages, bottleneck_s=best[n_stages][n], created_by="balanced")
