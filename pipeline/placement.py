"""Where each stage of a pipelined model runs: the one placement type of ``partition``, the
SlimEdge planner and the plan message on ``control/plan``.

A :class:`Placement` cuts a model of ``num_blocks`` blocks into contiguous stages; stage ``i``
runs blocks ``[start, end)`` on node ``node`` (the node id is the device's name in a device
file) at pruning level ``level`` when the placement says so. The SlimEdge planner sets levels;
``partition`` does not; the plan message carries none (levels travel on
``control/stage/<i>``).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace

from pipeline.errors import ConfigError


@dataclass(frozen=True)
class SliceBounds:
    """Blocks ``[start, end)`` of a model."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if self.start < 0 or self.end <= self.start:
            raise ConfigError(f"bad slice bounds [{self.start}, {self.end})")

    def __len__(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class StagePlacement:
    """Blocks ``bounds`` on node ``node``, at ``level`` (None: not part of this placement)."""

    bounds: SliceBounds
    node: str
    level: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.bounds, SliceBounds):
            raise ConfigError(f"stage bounds must be SliceBounds, got {self.bounds!r}")
        for key in ("start", "end"):
            v = getattr(self.bounds, key)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ConfigError(f"stage {key} must be an integer, got {v!r}")
        if not isinstance(self.node, str) or not self.node:
            raise ConfigError(f"stage node must be a non-empty string, got {self.node!r}")
        if self.level is not None and (
            isinstance(self.level, bool) or not isinstance(self.level, int) or self.level < 0
        ):
            raise ConfigError(f"stage level must be an integer >= 0, got {self.level!r}")


@dataclass(frozen=True)
class Placement:
    """Stages in pipeline order: the first starts at block 0, each starts where the previous
    one ends, and a node runs at most one stage."""

    stages: tuple[StagePlacement, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.stages, tuple) or not self.stages:
            raise ConfigError("a placement needs at least one stage")
        if self.stages[0].bounds.start != 0:
            raise ConfigError(f"the first stage must start at block 0, got {self.bounds[0]}")
        for i, (prev, nxt) in enumerate(itertools.pairwise(self.stages), start=1):
            if nxt.bounds.start != prev.bounds.end:
                raise ConfigError(
                    f"stage {i} is not contiguous with the previous one: blocks "
                    f"[{prev.bounds.start}, {prev.bounds.end}) then "
                    f"[{nxt.bounds.start}, {nxt.bounds.end})"
                )
        if len(set(self.nodes)) != len(self.nodes):
            raise ConfigError(f"a node may run only one stage, got {list(self.nodes)}")

    @classmethod
    def build(
        cls,
        bounds: Sequence[SliceBounds],
        nodes: Sequence[str],
        levels: Sequence[int] | None = None,
    ) -> Placement:
        """Stage ``i`` runs ``bounds[i]`` on ``nodes[i]`` (at ``levels[i]``)."""
        if len(bounds) != len(nodes) or (levels is not None and len(levels) != len(bounds)):
            raise ConfigError(
                f"need one node (and level) per slice: {len(bounds)} slices, "
                f"{len(nodes)} nodes" + ("" if levels is None else f", {len(levels)} levels")
            )
        lv: Sequence[int | None] = [None] * len(bounds) if levels is None else levels
        return cls(
            tuple(StagePlacement(b, n, v) for b, n, v in zip(bounds, nodes, lv, strict=True))
        )

    @property
    def num_blocks(self) -> int:
        return self.stages[-1].bounds.end

    @property
    def bounds(self) -> tuple[SliceBounds, ...]:
        return tuple(s.bounds for s in self.stages)

    @property
    def nodes(self) -> tuple[str, ...]:
        return tuple(s.node for s in self.stages)

    @property
    def levels(self) -> tuple[int | None, ...]:
        return tuple(s.level for s in self.stages)

    def stage_of(self, node: str) -> int | None:
        """The stage ``node`` runs, or None when it runs none."""
        for i, s in enumerate(self.stages):
            if s.node == node:
                return i
        return None

    def without_levels(self) -> Placement:
        return Placement(tuple(replace(s, level=None) for s in self.stages))

    def placement_hash(self) -> str:
        """A short hash of the bounds and nodes (not the levels): a calibration file records
        it, so a controller holding the retained plan can check the file belongs to it."""
        key = [[s.bounds.start, s.bounds.end, s.node] for s in self.stages]
        return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]
