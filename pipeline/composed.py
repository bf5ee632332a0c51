"""A whole pipeline of prunable slices in one process: the reference the nodes must match,
and what calibration and ``prune-curve`` measure accuracy with.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pipeline.checkpoint import Checkpoint
from pipeline.errors import ConfigError
from pipeline.models import SliceableResNet
from pipeline.pruning import DEFAULT_RATIOS, PrunableSlice
from pipeline.slicing import ModelSlice, SliceBounds, slice_model


@torch.no_grad()
def slice_inputs(model: SliceableResNet, bounds: SliceBounds, x: torch.Tensor) -> torch.Tensor:
    """What the unpruned model feeds slice ``bounds`` when given inputs ``x``."""
    for i in range(bounds.start):
        x = model.blocks[i](x)
    return x


def build_prunable(ckpt: Checkpoint, bounds: SliceBounds, *,
                   ratios: Sequence[float] = DEFAULT_RATIOS, round_to: int = 8,
                   recalibrate_bn: bool = True,
                   model: SliceableResNet | None = None) -> PrunableSlice:
    """The prunable slice ``bounds`` of a checkpoint's model, every level built.

    With ``recalibrate_bn`` (default), each pruned level's BatchNorm statistics are
    re-estimated on the checkpoint's calibration images (no weight update).
    """
    model = model or ckpt.build()
    calib = None
    if recalibrate_bn:
        images = ckpt.calibration_tensor()
        if images is None:
            raise ConfigError("this checkpoint carries no calibration images; "
                              "pass recalibrate_bn=False")
        calib = slice_inputs(model, bounds, images)
    return PrunableSlice(ModelSlice(model, bounds), ratios, round_to=round_to,
                         calibration_inputs=calib)


class ComposedPipeline:
    """Prunable slices run back to back, passing only kept channels across each boundary."""

    def __init__(self, ckpt: Checkpoint, bounds: Sequence[SliceBounds], *,
                 ratios: Sequence[float] = DEFAULT_RATIOS, round_to: int = 8,
                 recalibrate_bn: bool = True) -> None:
        model = ckpt.build()
        slice_model(model, bounds)  # validates contiguity and coverage
        self.bounds = list(bounds)
        self.slices = [build_prunable(ckpt, b, ratios=ratios, round_to=round_to,
                                      recalibrate_bn=recalibrate_bn, model=model)
                       for b in bounds]
        self.ratios = tuple(ratios)

    def set_levels(self, levels: Sequence[int]) -> None:
        if len(levels) != len(self.slices):
            raise ConfigError(f"need {len(self.slices)} levels, got {len(levels)}")
        for s, level in zip(self.slices, levels, strict=True):
            s.set_level(level)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        channels = None
        for s in self.slices:
            out = s(x, channels)
            x, channels = out.tensor, out.channels
        return x
