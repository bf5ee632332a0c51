"""The retained plan on ``control/plan``: which node runs which blocks, as JSON.

    {"v": 1, "kind": "plan", "version": 3, "num_blocks": 5,
     "stages": [{"stage": 0, "start": 0, "end": 2, "node": "n0"}, ...]}

Stages are contiguous and cover every block; a node appears at most once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bus.topics import check_name
from pipeline import codec
from pipeline.errors import CodecError, ConfigError
from pipeline.slicing import SliceBounds


@dataclass(frozen=True)
class StagePlacement:
    stage: int
    bounds: SliceBounds
    node: str


@dataclass(frozen=True)
class PlanMessage:
    version: int
    num_blocks: int
    stages: tuple[StagePlacement, ...]
    reason: str = ""

    def __post_init__(self) -> None:
        if self.version < 0 or not self.stages:
            raise ConfigError("a plan needs a version >= 0 and at least one stage")
        edge = 0
        for i, st in enumerate(self.stages):
            check_name("node", st.node)
            if st.stage != i or st.bounds.start != edge:
                raise ConfigError(f"plan stage {i} is not contiguous with the previous one")
            edge = st.bounds.end
        if edge != self.num_blocks:
            raise ConfigError(f"plan covers blocks [0, {edge}), the model has {self.num_blocks}")
        nodes = [st.node for st in self.stages]
        if len(set(nodes)) != len(nodes):
            raise ConfigError("a node appears twice in the plan")

    @classmethod
    def build(
        cls,
        version: int,
        num_blocks: int,
        bounds: Sequence[SliceBounds],
        nodes: Sequence[str],
        reason: str = "",
    ) -> PlanMessage:
        if len(bounds) != len(nodes):
            raise ConfigError("need one node per slice")
        return cls(
            version,
            num_blocks,
            tuple(
                StagePlacement(i, b, n) for i, (b, n) in enumerate(zip(bounds, nodes, strict=True))
            ),
            reason,
        )

    def placement_of(self, node: str) -> tuple[int, SliceBounds] | None:
        for st in self.stages:
            if st.node == node:
                return st.stage, st.bounds
        return None

    @property
    def bounds(self) -> list[SliceBounds]:
        return [st.bounds for st in self.stages]

    @property
    def nodes(self) -> list[str]:
        return [st.node for st in self.stages]

    def to_json(self) -> bytes:
        return codec.encode_json(
            "plan",
            {
                "version": self.version,
                "num_blocks": self.num_blocks,
                "reason": self.reason,
                "stages": [
                    {
                        "stage": st.stage,
                        "start": st.bounds.start,
                        "end": st.bounds.end,
                        "node": st.node,
                    }
                    for st in self.stages
                ],
            },
        )

    @classmethod
    def from_json(cls, payload: bytes) -> PlanMessage:
        body = codec.decode_json(payload, expect_kind="plan")
        try:
            stages = tuple(
                StagePlacement(
                    int(s["stage"]), SliceBounds(int(s["start"]), int(s["end"])), str(s["node"])
                )
                for s in body["stages"]
            )
            return cls(
                int(body["version"]), int(body["num_blocks"]), stages, str(body.get("reason", ""))
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CodecError(f"malformed plan: {exc!r}") from exc
        except ConfigError as exc:  # well-formed, but not a plan (gaps, a node twice, ...)
            raise CodecError(str(exc)) from exc
