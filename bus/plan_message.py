"""The retained plan on ``control/plan``: which node runs which blocks, as JSON.

    {"v": 1, "kind": "plan", "version": 3, "num_blocks": 5,
     "stages": [{"stage": 0, "start": 0, "end": 2, "node": "n0"}, ...]}

The stages are a :class:`~pipeline.placement.Placement` (contiguous, covering every block, a
node at most once) without levels: levels travel on ``control/stage/<i>``.
"""

from __future__ import annotations

from dataclasses import dataclass

from bus.topics import check_name
from pipeline import codec
from pipeline.errors import CodecError, ConfigError
from pipeline.placement import Placement, SliceBounds, StagePlacement


@dataclass(frozen=True)
class PlanMessage:
    version: int
    placement: Placement
    reason: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.version, bool) or not isinstance(self.version, int) or self.version < 0:
            raise ConfigError(f"a plan needs an integer version >= 0, got {self.version!r}")
        if not isinstance(self.placement, Placement):
            raise ConfigError(f"a plan needs a Placement, got {type(self.placement).__name__}")
        for node in self.placement.nodes:
            check_name("node", node)
        if any(level is not None for level in self.placement.levels):
            raise ConfigError(
                "a plan message carries no levels (they go on control/stage/<i>): "
                "use placement.without_levels()"
            )

    @property
    def num_blocks(self) -> int:
        return self.placement.num_blocks

    @property
    def bounds(self) -> list[SliceBounds]:
        return list(self.placement.bounds)

    @property
    def nodes(self) -> list[str]:
        return list(self.placement.nodes)

    def placement_of(self, node: str) -> tuple[int, SliceBounds] | None:
        """``(stage, bounds)`` of ``node``, or None when the plan gives it no stage."""
        stage = self.placement.stage_of(node)
        return None if stage is None else (stage, self.placement.stages[stage].bounds)

    def to_json(self) -> bytes:
        return codec.encode_json(
            "plan",
            {
                "version": self.version,
                "num_blocks": self.num_blocks,
                "reason": self.reason,
                "stages": [
                    {"stage": i, "start": st.bounds.start, "end": st.bounds.end, "node": st.node}
                    for i, st in enumerate(self.placement.stages)
                ],
            },
        )

    @classmethod
    def from_json(cls, payload: bytes) -> PlanMessage:
        body = codec.decode_json(payload, expect_kind="plan")
        try:
            rows = list(body["stages"])
            stages = tuple(
                StagePlacement(
                    SliceBounds(
                        codec.check_int(s["start"], "start"), codec.check_int(s["end"], "end")
                    ),
                    codec.check_text(s["node"], "node"),
                )
                for s in rows
            )
            indices = [codec.check_int(s["stage"], "stage") for s in rows]
            version = codec.check_int(body["version"], "version")
            num_blocks = codec.check_int(body["num_blocks"], "num_blocks")
            reason = str(body.get("reason", ""))
        except (KeyError, TypeError, ValueError) as exc:
            raise CodecError(f"malformed plan: {exc!r}") from exc
        if indices != list(range(len(indices))):
            raise CodecError(f"plan stages must be numbered 0, 1, ... in order, got {indices}")
        try:  # well-formed, but not a plan (gaps, a node twice, ...)
            message = cls(version, Placement(stages), reason)
        except ConfigError as exc:
            raise CodecError(str(exc)) from exc
        if message.num_blocks != num_blocks:
            raise CodecError(
                f"plan covers blocks [0, {message.num_blocks}), the model has {num_blocks}"
            )
        return message
