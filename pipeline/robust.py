"""Width-robust training: train the full network and the sub-networks the nodes will run.

A node prunes a slice at run time by ranking each coupled channel group by L1 norm
(:func:`pipeline.pruning.prune_slice`) and keeping ``kept_channels(C, ratio, 8)`` channels.
Training here makes every such sub-network a good network without fine-tuning:

- :class:`SliceRanker` computes, from the *current* weights, exactly the channels
  ``prune_slice`` would keep for one slice at one ratio. It ranks a shadow copy of the slice
  with the same Torch-Pruning dependency graph, importance (mean over the group's layers of
  per-channel L1) and group order, and emulates the pruning of each group by zeroing its
  channels (``prune_slice`` removes them, which changes the L1 sums of the groups ranked after
  it; zeroing changes them the same way).
- :class:`WidthMasker` applies a sub-network to the live model with forward hooks: a pruned
  channel is zeroed at the output of every BatchNorm of its group (for a residual stream that
  is every producer, which is the same as removing it), and a slice that reads only some of
  its input channels gets them masked at its first block.
- :class:`SubnetSampler` draws the sub-networks of one step by the sandwich rule: the full
  width, the smallest width, and a few random ones, some with random cuts and a different
  level per slice (the controller prunes slices to different levels).
- :func:`sandwich_step` trains them: the full network on the labels, every sub-network by
  in-place distillation from the full network's detached soft predictions. Sub-network
  passes use batch statistics and leave the BatchNorm running statistics alone, so the stored
  statistics are the full network's; nodes re-estimate them per pruned level.
"""

from __future__ import annotations

import copy
import itertools
import logging
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

from pipeline.errors import ConfigError
from pipeline.models import Head, SliceableResNet
from pipeline.placement import SliceBounds
from pipeline.pruning import DEFAULT_RATIOS, _Adapted, kept_channels, validate_ratios
from pipeline.slicing import ModelSlice

log = logging.getLogger(__name__)

_BatchNorm = nn.modules.batchnorm._BatchNorm


@dataclass(frozen=True)
class Subnet:
    """A sub-network as the nodes run it: contiguous slices, each pruned at one ratio."""

    slices: tuple[SliceBounds, ...]
    ratios: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.slices or len(self.slices) != len(self.ratios):
            raise ConfigError("a sub-network needs one ratio per slice")
        if self.slices[0].start != 0:
            raise ConfigError("a sub-network's slices must start at block 0")
        for a, b in itertools.pairwise(self.slices):
            if a.end != b.start:
                raise ConfigError(f"slices {a} and {b} are not contiguous")
        if any(not 0.0 <= r < 1.0 for r in self.ratios):
            raise ConfigError(f"ratios must be in [0, 1), got {self.ratios}")

    @classmethod
    def uniform(cls, num_blocks: int, ratio: float) -> Subnet:
        """The whole model as one slice at ``ratio`` (what ``prune-curve`` measures)."""
        return cls((SliceBounds(0, num_blocks),), (float(ratio),))

    @property
    def is_full(self) -> bool:
        return all(r == 0.0 for r in self.ratios)

    def describe(self) -> str:
        return " ".join(
            f"[{b.start},{b.end})@{r:g}" for b, r in zip(self.slices, self.ratios, strict=True)
        )


@dataclass(frozen=True)
class SliceMasks:
    """The channels a node keeps in one slice at one ratio, in the whole model's names.

    ``bn``: BatchNorm module name (in the full model) -> kept channel indices, for every
    BatchNorm that loses channels; ``inputs``: kept input channels of the slice (None: all).
    """

    bounds: SliceBounds
    ratio: float
    bn: dict[str, torch.Tensor]
    inputs: torch.Tensor | None


def _importance() -> tp.importance.Importance:
    # The same scorer as pipeline.pruning.prune_slice: per-channel L1, mean over the group.
    return tp.importance.MagnitudeImportance(p=1, group_reduction="mean", normalizer=None)


class SliceRanker:
    """Ranks the channels of one slice of a live model the way ``prune_slice`` does.

    Holds a shadow copy of the slice (between the same identity adapters as ``prune_slice``)
    and its dependency graph, built once; :meth:`masks` copies the weights of ``live``
    (default: ``model``) in and ranks. ``model`` must carry no forward hooks: the shadow is a
    deep copy and Torch-Pruning traces it.
    """

    def __init__(
        self, model: SliceableResNet, bounds: SliceBounds, *, live: nn.Module | None = None
    ) -> None:
        model_slice = ModelSlice(model, bounds)  # deep-copies the blocks
        self.bounds = bounds
        c_in = None if model_slice.is_first else model_slice.in_channels
        c_out = None if model_slice.is_last else model_slice.out_channels
        self._net = _Adapted(model_slice.body, c_in, c_out).eval()
        example = torch.zeros(1, *model_slice.in_shape)
        with torch.enable_grad():  # Torch-Pruning traces with autograd
            self._graph = tp.DependencyGraph().build_dependency(self._net, example_inputs=example)
        ignored: list[nn.Module] = [m.fc for m in self._net.modules() if isinstance(m, Head)]
        if self._net.out_adapter is not None:
            ignored.append(self._net.out_adapter)
        self._groups = list(
            self._graph.get_all_groups(
                ignored_layers=ignored, root_module_types=[nn.Conv2d, nn.Linear]
            )
        )
        self._importance = _importance()
        live_params = dict((live or model).named_parameters())
        self._pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        for name, param in self._net.body.named_parameters():
            index, rest = name.split(".", 1)
            self._pairs.append((param, live_params[f"blocks.{bounds.start + int(index)}.{rest}"]))
        self._bn_names = {
            m: f"blocks.{bounds.start + int(name.split('.', 1)[0])}.{name.split('.', 1)[1]}"
            for name, m in self._net.body.named_modules()
            if isinstance(m, _BatchNorm)
        }

    @torch.no_grad()
    def _load_live(self) -> None:
        for shadow, live in self._pairs:
            shadow.copy_(live)
        for adapter in (self._net.in_adapter, self._net.out_adapter):
            if adapter is not None:
                c = adapter.weight.shape[0]
                adapter.weight.copy_(torch.eye(c).view(c, c, 1, 1))

    @torch.no_grad()
    def masks(self, ratio: float, round_to: int = 8) -> SliceMasks:
        """The channels ``prune_slice`` would keep at ``ratio`` given the live weights now."""
        pruned_bn: dict[str, list[int]] = {}
        pruned_in: list[int] = []
        if ratio > 0:
            self._load_live()
            for group in self._groups:
                scores = self._importance(group)
                if scores is None:
                    continue
                n = len(scores)
                keep = kept_channels(n, ratio, round_to)
                if keep >= n:
                    continue
                order = torch.argsort(scores, stable=True)
                root = group[0].dep
                doomed = self._graph.get_pruning_group(
                    root.target.module, root.handler, order[: n - keep].tolist()
                )
                for dep, idxs in doomed:
                    plain = [int(i) for i in tp._helpers.to_plain_idxs(idxs)]
                    layer = dep.target.module
                    self._zero(layer, dep.handler.__name__, plain)
                    if isinstance(layer, _BatchNorm):
                        pruned_bn.setdefault(self._bn_names[layer], []).extend(plain)
                    elif (
                        layer is self._net.in_adapter
                        and dep.handler.__name__ == "prune_out_channels"
                    ):
                        pruned_in.extend(plain)
        width = {name: int(m.num_features) for m, name in self._bn_names.items()}
        bn = {name: _complement(width[name], idxs) for name, idxs in pruned_bn.items()}
        inputs = None
        if pruned_in and self._net.in_adapter is not None:
            inputs = _complement(self._net.in_adapter.weight.shape[0], pruned_in)
        return SliceMasks(self.bounds, float(ratio), bn, inputs)

    @staticmethod
    def _zero(layer: nn.Module, handler: str, idxs: list[int]) -> None:
        """Emulate removing channels ``idxs`` for the L1 sums of groups ranked later."""
        index = torch.tensor(idxs, dtype=torch.long)
        if isinstance(layer, nn.Conv2d | nn.Linear):
            if handler == "prune_out_channels":
                layer.weight.index_fill_(0, index, 0.0)
                if layer.bias is not None:
                    layer.bias.index_fill_(0, index, 0.0)
            elif handler == "prune_in_channels":
                layer.weight.index_fill_(1, index, 0.0)
        elif isinstance(layer, _BatchNorm) and layer.affine:
            layer.weight.index_fill_(0, index, 0.0)
            layer.bias.index_fill_(0, index, 0.0)


def _complement(n: int, dropped: Sequence[int]) -> torch.Tensor:
    keep = torch.ones(n, dtype=torch.bool)
    keep[torch.tensor(sorted(set(dropped)), dtype=torch.long)] = False
    return torch.nonzero(keep).flatten()


class WidthMasker:
    """Runs a live model as any of its sub-networks, by masking channels with forward hooks.

    Use as a context manager (the hooks are removed on exit). :meth:`use` selects the
    sub-network for the next forward passes; masks are computed from the current weights and
    cached until :meth:`refresh` (call it after optimizer steps).
    """

    def __init__(self, model: SliceableResNet, *, round_to: int = 8) -> None:
        self.model = model
        self.round_to = round_to
        # rankers are built from a hook-free copy (Torch-Pruning traces it), read live weights
        self._template = copy.deepcopy(model).eval()
        self._rankers: dict[SliceBounds, SliceRanker] = {}
        self._cache: dict[tuple[SliceBounds, float], SliceMasks] = {}
        self._bn_scale: dict[str, torch.Tensor] = {}
        self._in_scale: dict[int, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.active: Subnet | None = None

    def __enter__(self) -> WidthMasker:
        for name, m in self.model.named_modules():
            if isinstance(m, _BatchNorm):
                self._handles.append(m.register_forward_hook(self._bn_hook(name)))
        for i, block in enumerate(self.model.blocks):
            self._handles.append(block.register_forward_pre_hook(self._input_hook(i)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.use(None)

    def _bn_hook(self, name: str) -> Callable[..., torch.Tensor | None]:
        def hook(
            module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor
        ) -> torch.Tensor | None:
            scale = self._bn_scale.get(name)
            return None if scale is None else out * scale

        return hook

    def _input_hook(self, index: int) -> Callable[..., tuple[torch.Tensor, ...] | None]:
        def hook(
            module: nn.Module, args: tuple[torch.Tensor, ...]
        ) -> tuple[torch.Tensor, ...] | None:
            scale = self._in_scale.get(index)
            return None if scale is None else (args[0] * scale, *args[1:])

        return hook

    def refresh(self) -> None:
        """Forget cached masks: the next :meth:`use` ranks the current weights again."""
        self._cache.clear()

    def slice_masks(self, bounds: SliceBounds, ratio: float) -> SliceMasks:
        key = (bounds, float(ratio))
        if key not in self._cache:
            if bounds not in self._rankers:
                self._rankers[bounds] = SliceRanker(self._template, bounds, live=self.model)
            self._cache[key] = self._rankers[bounds].masks(ratio, self.round_to)
        return self._cache[key]

    def use(self, subnet: Subnet | None) -> None:
        """Run the next forward passes as ``subnet`` (None or a full-width one: no masks)."""
        self._bn_scale, self._in_scale = {}, {}
        self.active = subnet
        if subnet is None or subnet.is_full:
            return
        if subnet.slices[-1].end != self.model.num_blocks:
            raise ConfigError(f"sub-network {subnet.describe()} does not cover the model")
        for bounds, ratio in zip(subnet.slices, subnet.ratios, strict=True):
            if ratio <= 0:
                continue
            masks = self.slice_masks(bounds, ratio)
            for name, kept in masks.bn.items():
                self._bn_scale[name] = _scale(self._num_features(name), kept)
            if masks.inputs is not None:
                n = _input_width(self.model, bounds.start)
                self._in_scale[bounds.start] = _scale(n, masks.inputs)

    def _num_features(self, name: str) -> int:
        module = self.model.get_submodule(name)
        if not isinstance(module, _BatchNorm):
            raise ConfigError(f"{name} is not a BatchNorm layer")  # pragma: no cover
        return int(module.num_features)

    @contextmanager
    def subnet(self, subnet: Subnet | None) -> Iterator[None]:
        previous = self.active
        self.use(subnet)
        try:
            yield
        finally:
            self.use(previous)


def _scale(n: int, kept: torch.Tensor) -> torch.Tensor:
    """A [1, n, 1, 1] (or [1, n]) 0/1 multiplier keeping channels ``kept``."""
    s = torch.zeros(n)
    s[kept] = 1.0
    return s.view(1, n, 1, 1)


def _input_width(model: SliceableResNet, block: int) -> int:
    first = model.blocks[block]
    for m in first.modules():
        if isinstance(m, nn.Conv2d):
            return int(m.in_channels)
        if isinstance(m, nn.Linear):
            return int(m.in_features)
    raise ConfigError(f"block {block} has no input layer")  # pragma: no cover


@contextmanager
def frozen_bn_stats(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers still normalise with batch statistics but stop updating running ones."""
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    saved = [bn.momentum for bn in bns]
    for bn in bns:
        bn.momentum = 0.0
    try:
        yield
    finally:
        for bn, momentum in zip(bns, saved, strict=True):
            bn.momentum = momentum


class SubnetSampler:
    """The sandwich rule over the system's levels.

    Each step: the smallest width (the largest ratio, whole model as one slice), and
    ``random_subnets`` random sub-networks. A random sub-network is, with probability
    ``mixed_prob``, the model cut at random points into 2..``max_slices`` slices with a random
    level each (not all zero); otherwise one slice at a random intermediate level.
    """

    def __init__(
        self,
        num_blocks: int,
        ratios: Sequence[float] = DEFAULT_RATIOS,
        *,
        random_subnets: int = 2,
        mixed_prob: float = 0.5,
        max_slices: int = 3,
        seed: int = 0,
    ) -> None:
        self.ratios = validate_ratios(ratios)
        if len(self.ratios) < 2:
            raise ConfigError("width-robust training needs at least one pruned level")
        if random_subnets < 0 or not 0.0 <= mixed_prob <= 1.0 or max_slices < 1:
            raise ConfigError("random_subnets >= 0, 0 <= mixed_prob <= 1, max_slices >= 1")
        self.num_blocks = num_blocks
        self.random_subnets = random_subnets
        self.mixed_prob = mixed_prob
        self.max_slices = max(1, min(max_slices, num_blocks))
        self._rng = random.Random(seed)

    @property
    def smallest(self) -> Subnet:
        return Subnet.uniform(self.num_blocks, self.ratios[-1])

    def sample(self) -> list[Subnet]:
        """The pruned sub-networks of one step (the full network is trained separately)."""
        return [self.smallest, *(self._random() for _ in range(self.random_subnets))]

    def _random(self) -> Subnet:
        rng = self._rng
        if self.max_slices >= 2 and rng.random() < self.mixed_prob:
            k = rng.randint(2, self.max_slices)
            cuts = sorted(rng.sample(range(1, self.num_blocks), k - 1))
            edges = [0, *cuts, self.num_blocks]
            bounds = tuple(SliceBounds(a, b) for a, b in itertools.pairwise(edges))
            ratios = [rng.choice(self.ratios) for _ in bounds]
            if all(r == 0.0 for r in ratios):
                ratios[rng.randrange(k)] = rng.choice(self.ratios[1:])
            return Subnet(bounds, tuple(ratios))
        middle = self.ratios[1:-1] or self.ratios[1:]
        return Subnet.uniform(self.num_blocks, rng.choice(middle))


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the student against the teacher's soft predictions (teacher detached)."""
    target = torch.softmax(teacher.detach(), dim=1)
    return -(target * torch.log_softmax(student, dim=1)).sum(1).mean()


@dataclass(frozen=True)
class StepResult:
    full_logits: torch.Tensor
    full_loss: float
    subnet_loss: float  # mean over the step's sub-networks


def sandwich_step(
    model: SliceableResNet,
    masker: WidthMasker,
    subnets: Sequence[Subnet],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    distill_weight: float = 1.0,
    label_loss: nn.Module | None = None,
) -> StepResult:
    """Forward and backward of one sandwich step; gradients accumulate (caller steps).

    The full network learns from the labels; every sub-network from
    ``distill_weight`` x (distillation from the full network) + (1 - distill_weight) x labels.
    """
    loss_fn = label_loss or nn.CrossEntropyLoss()
    masker.use(None)
    full = model(x)
    loss = loss_fn(full, y)
    loss.backward()
    sub_losses = []
    with frozen_bn_stats(model):
        for subnet in subnets:
            with masker.subnet(subnet):
                logits = model(x)
            sub = distill_weight * distillation_loss(logits, full)
            if distill_weight < 1.0:
                sub = sub + (1.0 - distill_weight) * loss_fn(logits, y)
            sub.backward()
            sub_losses.append(float(sub.detach()))
    mean_sub = sum(sub_losses) / len(sub_losses) if sub_losses else 0.0
    return StepResult(full.detach(), float(loss.detach()), mean_sub)
