"""A whole pipeline of prunable slices in one process: the reference the nodes must match,
and what calibration and ``prune-curve`` measure accuracy with.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pipeline.checkpoint import Checkpoint
from pipeline.errors import ConfigError
from pipeline.models import SliceableResNet
from pipeline.placement import SliceBounds
from pipeline.pruning import DEFAULT_RATIOS, PrunableSlice, scatter_channels
from pipeline.slicing import ModelSlice, slice_model


@torch.no_grad()
def slice_inputs(model: SliceableResNet, bounds: SliceBounds, x: torch.Tensor) -> torch.Tensor:
    """What the unpruned model feeds slice ``bounds`` when given inputs ``x``."""
    for i in range(bounds.start):
        x = model.blocks[i](x)
    return x


def build_prunable(
    ckpt: Checkpoint,
    bounds: SliceBounds,
    *,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    round_to: int = 8,
    recalibrate_bn: bool = True,
    model: SliceableResNet | None = None,
) -> PrunableSlice:
    """The prunable slice ``bounds`` of a checkpoint's model, every level built.

    With ``recalibrate_bn`` (default), BatchNorm statistics are re-estimated on the
    checkpoint's calibration images (no weight update) for every pair of this slice's level
    and the upstream level: the inputs for upstream level u are what the blocks before this
    slice produce when pruned uniformly at level u (an approximation when several upstream
    slices run at different levels).
    """
    model = model or ckpt.build()
    calib: dict[int, torch.Tensor] | None = None
    if recalibrate_bn:
        images = ckpt.calibration_tensor()
        if images is None:
            raise ConfigError(
                "this checkpoint carries no calibration images; pass recalibrate_bn=False"
            )
        calib = upstream_inputs(model, bounds, images, ratios, round_to)
    return PrunableSlice(
        ModelSlice(model, bounds), ratios, round_to=round_to, calibration_inputs=calib
    )


def upstream_inputs(
    model: SliceableResNet,
    bounds: SliceBounds,
    images: torch.Tensor,
    ratios: Sequence[float],
    round_to: int,
) -> dict[int, torch.Tensor]:
    """Full-width inputs of slice ``bounds`` for every upstream level (0 only for the first
    slice): the prefix [0, start) pruned uniformly at that level, scattered to full width."""
    if bounds.start == 0:
        return {0: images}
    prefix = PrunableSlice(
        ModelSlice(model, SliceBounds(0, bounds.start)),
        ratios,
        round_to=round_to,
        calibration_inputs=images,
    )
    full = prefix.model_slice.out_channels
    out: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for level in range(prefix.num_levels):
            prefix.set_level(level)
            y = prefix(images)
            out[level] = scatter_channels(y.tensor, y.channels, full)
    return out


class ComposedPipeline:
    """Prunable slices run back to back, passing only kept channels across each boundary."""

    def __init__(
        self,
        ckpt: Checkpoint,
        bounds: Sequence[SliceBounds],
        *,
        ratios: Sequence[float] = DEFAULT_RATIOS,
        round_to: int = 8,
        recalibrate_bn: bool = True,
    ) -> None:
        model = ckpt.build()
        slice_model(model, bounds)  # validates contiguity and coverage
        self.bounds = list(bounds)
        self.slices = [
            build_prunable(
                ckpt,
                b,
                ratios=ratios,
                round_to=round_to,
                recalibrate_bn=recalibrate_bn,
                model=model,
            )
            for b in bounds
        ]
        self.ratios = tuple(ratios)

    def set_levels(self, levels: Sequence[int]) -> None:
        if len(levels) != len(self.slices):
            raise ConfigError(f"need {len(self.slices)} levels, got {len(levels)}")
        for s, level in zip(self.slices, levels, strict=True):
            s.set_level(level)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        channels = None
        upstream: int | None = None
        for s in self.slices:
            out = s(x, channels, upstream)
            x, channels, upstream = out.tensor, out.channels, s.level
        return x
