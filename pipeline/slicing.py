"""Cutting a model into contiguous slices at block boundaries.

A slice is blocks ``[start, end)`` of a :class:`~pipeline.models.SliceableResNet`. Composing
the slices of a model in order gives the model back.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Sequence

import torch
from torch import nn

from pipeline.errors import ConfigError
from pipeline.models import SliceableResNet
from pipeline.placement import SliceBounds


def parse_cuts(cuts: str | Sequence[int], num_blocks: int) -> list[SliceBounds]:
    """Cut points (block indices where a new slice starts) -> bounds covering every block.

    ``"2,4"`` on a 5-block model gives ``[0,2) [2,4) [4,5)``.
    """
    if isinstance(cuts, str):
        try:
            points = [int(c) for c in cuts.replace(" ", "").split(",") if c]
        except ValueError as exc:
            raise ConfigError(f"cut points must be integers, got {cuts!r}") from exc
    else:
        points = list(cuts)
    if sorted(set(points)) != points or any(p <= 0 or p >= num_blocks for p in points):
        raise ConfigError(
            f"cut points must be increasing block indices in 1..{num_blocks - 1}, got {points}"
        )
    edges = [0, *points, num_blocks]
    return [SliceBounds(a, b) for a, b in itertools.pairwise(edges)]


def even_cuts(num_blocks: int, num_slices: int) -> list[SliceBounds]:
    """Bounds with (nearly) the same number of blocks per slice."""
    if not 1 <= num_slices <= num_blocks:
        raise ConfigError(f"cannot cut {num_blocks} blocks into {num_slices} slices")
    edges = [round(i * num_blocks / num_slices) for i in range(num_slices + 1)]
    return [SliceBounds(a, b) for a, b in itertools.pairwise(edges)]


class ModelSlice(nn.Module):
    """Blocks ``[start, end)`` of a model as one module, with the shapes at its two ends.

    ``in_shape`` / ``out_shape`` are per-sample shapes (no batch dimension).
    """

    def __init__(self, model: SliceableResNet, bounds: SliceBounds) -> None:
        super().__init__()
        if bounds.end > model.num_blocks:
            raise ConfigError(f"slice {bounds} exceeds the model's {model.num_blocks} blocks")
        self.bounds = bounds
        self.body = nn.Sequential(
            *[copy.deepcopy(model.blocks[i]) for i in range(bounds.start, bounds.end)]
        )
        self.is_first = bounds.start == 0
        self.is_last = bounds.end == model.num_blocks
        self.block_names = model.block_names()[bounds.start : bounds.end]
        with torch.no_grad():
            was_training = model.training
            model.eval()
            x = torch.zeros(model.input_shape(1))
            for i in range(bounds.start):
                x = model.blocks[i](x)
            self.in_shape = tuple(x.shape[1:])
            for i in range(bounds.start, bounds.end):
                x = model.blocks[i](x)
            self.out_shape = tuple(x.shape[1:])
            model.train(was_training)

    @property
    def in_channels(self) -> int:
        return int(self.in_shape[0])

    @property
    def out_channels(self) -> int:
        return int(self.out_shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def slice_model(model: SliceableResNet, bounds: Sequence[SliceBounds]) -> list[ModelSlice]:
    """Cut ``model`` into slices; the bounds must be contiguous and cover every block."""
    if not bounds or bounds[0].start != 0 or bounds[-1].end != model.num_blocks:
        raise ConfigError("slices must start at block 0 and end at the last block")
    for a, b in itertools.pairwise(bounds):
        if a.end != b.start:
            raise ConfigError(f"slices {a} and {b} are not contiguous")
    return [ModelSlice(model, b) for b in bounds]
