"""Run-time structured pruning of a model slice with Torch-Pruning.

Every prunable layer of a slice is pruned with one uniform ratio; channels are ranked once by
their L1 norm (coupled layers, e.g. a residual stream, are ranked and pruned together by
Torch-Pruning's dependency graph). Kept channel counts are rounded to a multiple of
``round_to`` (8 by default) because a measured speedup, not a FLOP count, is what the
controller needs. The classifier's outputs are never pruned.

Boundaries. The tensor between two slices is a residual stream whose channels belong to the
same coupled group as layers inside both slices. To prune such a group inside one slice only,
the slice is wrapped, for the duration of pruning, in two 1x1 identity convolutions:

    full-width input [B, C_in] -> in_adapter (C_in -> C_in) -> body -> out_adapter (C_out -> C_out)

Torch-Pruning removes rows of ``in_adapter`` (the slice now reads only some input channels)
and columns of ``out_adapter`` (the slice now produces only some output channels). The pruned
adapters are then replaced by index lists: a :class:`ChannelGather` in front of the body, and
``out_channels``, the indices the slice emits. The next slice scatters what it receives back
into full width (zeros elsewhere) with :func:`scatter_channels`. Pruning therefore also cuts
the bytes on the wire.

A :class:`PrunableSlice` keeps the full weights, builds each level's variant once at start-up,
and switches level by swapping a reference between two requests.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

from pipeline.errors import ConfigError
from pipeline.models import Head
from pipeline.slicing import ModelSlice

log = logging.getLogger(__name__)

DEFAULT_RATIOS: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)


def validate_ratios(ratios: Sequence[float]) -> tuple[float, ...]:
    out = tuple(float(r) for r in ratios)
    if not out or out[0] != 0.0:
        raise ConfigError("pruning levels must start at ratio 0 (the unpruned slice)")
    if any(b <= a for a, b in itertools.pairwise(out)) or out[-1] >= 1.0:
        raise ConfigError(f"pruning ratios must increase strictly and stay below 1, got {out}")
    return out


def kept_channels(channels: int, ratio: float, round_to: int) -> int:
    """Channels kept when pruning ``ratio`` of ``channels``, rounded to a multiple of round_to.

    Rounds to the nearest multiple, never below ``round_to`` and never above ``channels``.
    """
    if ratio <= 0:
        return channels
    want = channels * (1.0 - ratio)
    if round_to <= 1:
        return max(1, min(channels, round(want)))
    keep = round_to * max(1, math.floor(want / round_to + 0.5 + 1e-9))
    return min(channels, keep)


class ChannelGather(nn.Module):
    """Selects input channels: [B, C_full, ...] -> [B, len(index), ...]."""

    index: torch.Tensor

    def __init__(self, index: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("index", index.to(torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(1, self.index)


def scatter_channels(x: torch.Tensor, channels: torch.Tensor | None, full: int) -> torch.Tensor:
    """[B, k, ...] holding channels ``channels`` of a full-width tensor -> [B, full, ...].

    Channels that were not sent are zeros. ``channels=None`` means ``x`` is already full width.
    """
    if channels is None:
        if x.shape[1] != full:
            raise ConfigError(f"expected {full} channels, got {x.shape[1]}")
        return x
    out = x.new_zeros((x.shape[0], full, *x.shape[2:]))
    out.index_copy_(1, channels.to(torch.long), x)
    return out


class _Adapted(nn.Module):
    """A slice body between identity 1x1 adapters (only used while pruning)."""

    def __init__(self, body: nn.Module, c_in: int | None, c_out: int | None) -> None:
        super().__init__()
        self.body = body
        self.in_adapter = _identity_conv(c_in) if c_in else None
        self.out_adapter = _identity_conv(c_out) if c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_adapter is not None:
            x = self.in_adapter(x)
        x = self.body(x)
        if self.out_adapter is not None:
            x = self.out_adapter(x)
        return x


def _identity_conv(c: int) -> nn.Conv2d:
    conv = nn.Conv2d(c, c, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(c).view(c, c, 1, 1))
    return conv


def _one_hot_index(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """Indices selected by a pruned identity matrix (rows or columns are one-hot)."""
    w = weight[:, :, 0, 0]
    idx = w.argmax(dim=dim)
    if not torch.all(w.sum(dim=dim) == 1):
        raise RuntimeError("pruned adapter is no longer a selection matrix")
    return idx.to(torch.long)


@dataclass
class PrunedVariant:
    """One pruning level of a slice: a ready-to-run module and its channel bookkeeping.

    ``in_channels``: which channels of the full-width input the module reads (None: all);
    ``out_channels``: which channels of the full-width output it emits (None: all, or logits).
    """

    level: int
    ratio: float
    module: nn.Module
    in_channels: torch.Tensor | None
    out_channels: torch.Tensor | None
    macs: int
    params: int
    build_s: float


def count_macs(module: nn.Module, in_shape: Sequence[int]) -> tuple[int, int]:
    """(MACs, parameters) of one forward pass on one sample of shape ``in_shape``."""
    macs, params = tp.utils.count_ops_and_params(module, torch.zeros(1, *in_shape))
    return int(macs), int(params)


def prune_slice(
    model_slice: ModelSlice, ratio: float, *, level: int = 0, round_to: int = 8
) -> PrunedVariant:
    """Build the variant of ``model_slice`` with ``ratio`` of every prunable layer removed.

    The slice itself is not modified. Ratio 0 gives a copy of the full slice.
    """
    start = time.perf_counter()
    c_in = None if model_slice.is_first else model_slice.in_channels
    c_out = None if model_slice.is_last else model_slice.out_channels
    net = _Adapted(copy.deepcopy(model_slice.body), c_in, c_out).eval()
    if ratio > 0:
        example = torch.zeros(1, *model_slice.in_shape)
        graph = tp.DependencyGraph().build_dependency(net, example_inputs=example)
        ignored: list[nn.Module] = [m.fc for m in net.modules() if isinstance(m, Head)]
        if net.out_adapter is not None:
            ignored.append(net.out_adapter)
        importance = tp.importance.MagnitudeImportance(p=1, group_reduction="mean", normalizer=None)
        groups = list(
            graph.get_all_groups(ignored_layers=ignored, root_module_types=[nn.Conv2d, nn.Linear])
        )
        for group in groups:
            scores = importance(group)
            if scores is None:
                continue
            n = len(scores)
            keep = kept_channels(n, ratio, round_to)
            if keep < n:
                # the lowest-L1 channels go; ties broken by index for determinism
                order = torch.argsort(scores, stable=True)
                group.prune(idxs=order[: n - keep].tolist())
    in_idx = _one_hot_index(net.in_adapter.weight, dim=1) if net.in_adapter is not None else None
    out_idx = _one_hot_index(net.out_adapter.weight, dim=0) if net.out_adapter is not None else None
    if in_idx is not None and len(in_idx) == c_in:
        in_idx = None if torch.equal(in_idx, torch.arange(c_in)) else in_idx
    if out_idx is not None and len(out_idx) == c_out:
        out_idx = None if torch.equal(out_idx, torch.arange(c_out)) else out_idx
    body: nn.Module = net.body
    module: nn.Module = nn.Sequential(ChannelGather(in_idx), body) if in_idx is not None else body
    module.eval()
    macs, params = count_macs(module, model_slice.in_shape)
    return PrunedVariant(
        level=level,
        ratio=ratio,
        module=module,
        in_channels=in_idx,
        out_channels=out_idx,
        macs=macs,
        params=params,
        build_s=time.perf_counter() - start,
    )


@torch.no_grad()
def recalibrate_batchnorm(module: nn.Module, inputs: torch.Tensor, batch_size: int = 64) -> None:
    """Re-estimate BatchNorm running statistics of ``module`` on ``inputs`` (no weight update).

    Resets every BatchNorm's running mean/var and averages them over all batches (cumulative
    moving average), then puts the module back in eval mode.
    """
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or len(inputs) == 0:
        return
    saved = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    module.train()
    for i in range(0, len(inputs), batch_size):
        module(inputs[i : i + batch_size])
    for bn, momentum in zip(bns, saved, strict=True):
        bn.momentum = momentum
    module.eval()


@dataclass(frozen=True)
class SliceOutput:
    """What a slice produces: only its kept channels, and which ones they are.

    ``channels`` is None when the tensor is full width (level 0, or logits).
    """

    tensor: torch.Tensor
    channels: torch.Tensor | None
    full_channels: int


class PrunableSlice:
    """A slice with every pruning level built once; switching level is a reference swap.

    ``calibration_inputs``: full-width inputs to this slice (a few hundred samples), either one
    tensor, or a mapping from the UPSTREAM slice's level to the inputs that the upstream
    prefix, pruned at that level, produces. BatchNorm statistics are re-estimated for every
    (own level, upstream level) pair and kept as small buffer sets: a downstream slice whose
    input lost channels upstream needs other statistics than one fed at full width, even at its
    own level 0. :meth:`forward` loads the set matching the request's upstream level (a copy of
    a few KB) before running. The unpruned pair keeps the trained statistics.
    """

    def __init__(
        self,
        model_slice: ModelSlice,
        ratios: Sequence[float] = DEFAULT_RATIOS,
        *,
        round_to: int = 8,
        calibration_inputs: torch.Tensor | Mapping[int, torch.Tensor] | None = None,
    ) -> None:
        self.model_slice = model_slice.eval()
        self.ratios = validate_ratios(ratios)
        self.round_to = round_to
        if isinstance(calibration_inputs, torch.Tensor):
            calibration_inputs = {0: calibration_inputs}
        inputs = dict(calibration_inputs or {})
        self.upstream_levels = tuple(sorted(inputs))
        self.variants: list[PrunedVariant] = []
        # per own level: upstream level -> BatchNorm (mean, var) buffers
        self._bn: list[dict[int, list[tuple[torch.Tensor, torch.Tensor]]]] = []
        self._loaded: list[int | None] = []
        for level, ratio in enumerate(self.ratios):
            variant = prune_slice(model_slice, ratio, level=level, round_to=round_to)
            stats: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
            for up, x in inputs.items():
                if ratio == 0 and up == 0:
                    continue  # the trained statistics
                # the variant gathers its own input channels from the full-width inputs
                recalibrate_batchnorm(variant.module, x)
                stats[up] = _bn_buffers(variant.module)
            loaded: int | None = None
            if stats:
                if ratio == 0:
                    stats[0] = _bn_buffers(model_slice.body)  # the trained statistics
                loaded = 0 if 0 in stats else min(stats)
                _load_bn(variant.module, stats[loaded])
            self._loaded.append(loaded)
            self._bn.append(stats)
            self.variants.append(variant)
            log.debug(
                "slice %s level %d (ratio %.2f): %d MACs, built in %.1f ms",
                model_slice.bounds,
                level,
                ratio,
                variant.macs,
                variant.build_s * 1e3,
            )
        self._active = self.variants[0]

    @property
    def level(self) -> int:
        return self._active.level

    @property
    def num_levels(self) -> int:
        return len(self.variants)

    @property
    def active(self) -> PrunedVariant:
        return self._active

    def set_level(self, level: int) -> None:
        """Switch to ``level``: O(1), takes effect from the next call of :meth:`forward`."""
        if not 0 <= level < len(self.variants):
            raise ConfigError(f"level {level} out of range 0..{len(self.variants) - 1}")
        self._active = self.variants[level]

    @torch.no_grad()
    def forward(
        self,
        x: torch.Tensor,
        channels: torch.Tensor | None = None,
        upstream_level: int | None = None,
    ) -> SliceOutput:
        """Run the active level on ``x`` ([B, k, ...] holding ``channels`` of the input).

        ``channels=None`` means ``x`` is full width; ``upstream_level`` is the level the
        previous slice ran at (None or unknown: unpruned). The variant is read once, so a
        concurrent :meth:`set_level` never mixes two levels within one request. Not
        thread-safe: one thread runs the forward passes (the node's worker).
        """
        variant = self._active
        stats = self._bn[variant.level]
        if stats:
            up = upstream_level if upstream_level in stats else 0
            if up not in stats:
                up = min(stats)
            if self._loaded[variant.level] != up:
                _load_bn(variant.module, stats[up])
                self._loaded[variant.level] = up
        if channels is not None:
            x = scatter_channels(x, channels, self.model_slice.in_channels)
        y = variant.module(x)
        full = self.model_slice.out_shape[0]
        return SliceOutput(y, variant.out_channels, int(full))

    __call__ = forward


def _batchnorms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _bn_buffers(module: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [
        (bn.running_mean.clone(), bn.running_var.clone())  # type: ignore[union-attr]
        for bn in _batchnorms(module)
    ]


def _load_bn(module: nn.Module, buffers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for bn, (mean, var) in zip(_batchnorms(module), buffers, strict=True):
        bn.running_mean.copy_(mean)  # type: ignore[union-attr]
        bn.running_var.copy_(var)  # type: ignore[union-attr]
