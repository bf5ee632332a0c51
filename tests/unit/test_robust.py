"""Width-robust training: the masks are the nodes' pruning, and sandwich steps train them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.errors import ConfigError
from pipeline.models import SliceableResNet, build_model, preset
from pipeline.placement import SliceBounds
from pipeline.pruning import DEFAULT_RATIOS, PrunableSlice, prune_slice
from pipeline.robust import (
    SliceRanker,
    Subnet,
    SubnetSampler,
    WidthMasker,
    distillation_loss,
    frozen_bn_stats,
    sandwich_step,
)
from pipeline.slicing import ModelSlice


def _model(name: str = "resnet-xs", seed: int = 0) -> SliceableResNet:
    """A model whose BatchNorm parameters and statistics are all distinct (identifiable)."""
    torch.manual_seed(seed)
    m = build_model(preset(name)).eval()
    g = torch.Generator().manual_seed(seed)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            n = mod.num_features
            assert mod.running_mean is not None and mod.running_var is not None
            mod.running_mean.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)
            mod.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            mod.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            mod.bias.data.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)
    return m


def _kept_by_prune_slice(model: SliceableResNet, ratio: float) -> dict[str, list[int]]:
    """Which channels of every BatchNorm ``prune_slice`` keeps on the whole model.

    Recovered from the pruned BatchNorm's running means, which are distinct per channel.
    """
    variant = prune_slice(ModelSlice(model, SliceBounds(0, model.num_blocks)), ratio)
    full = dict(model.named_modules())
    kept = {}
    for name, bn in variant.module.named_modules():
        if isinstance(bn, nn.BatchNorm2d):
            index, rest = name.split(".", 1)
            live = f"blocks.{index}.{rest}"
            original = full[live].running_mean
            assert isinstance(original, torch.Tensor) and bn.running_mean is not None
            kept[live] = [int(torch.nonzero(original == v).flatten()[0]) for v in bn.running_mean]
    return kept


@pytest.mark.parametrize("name", ["resnet-xs", "resnet-s"])
def test_masks_select_exactly_the_channels_prune_slice_keeps(name):
    model = _model(name)
    ranker = SliceRanker(model, SliceBounds(0, model.num_blocks))
    bns = {n: m.num_features for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    pruned_somewhere = False
    for ratio in DEFAULT_RATIOS:
        masks = ranker.masks(ratio)
        expected = _kept_by_prune_slice(model, ratio)
        assert masks.inputs is None  # the first slice reads its whole input
        for bn_name, width in bns.items():
            got = masks.bn.get(bn_name, torch.arange(width)).tolist()
            assert got == sorted(expected[bn_name]), (ratio, bn_name)
            pruned_somewhere |= len(got) < width
    assert pruned_somewhere


def test_masked_model_computes_what_the_pruned_slices_compute():
    """Per-slice levels on cuts: masks (BN outputs + slice inputs) == the node-side chain."""
    model = _model("resnet-xs")
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    subnets = [
        Subnet.uniform(model.num_blocks, 0.3),
        Subnet((SliceBounds(0, 2), SliceBounds(2, 4), SliceBounds(4, 5)), (0.3, 0.1, 0.5)),
        Subnet((SliceBounds(0, 3), SliceBounds(3, 5)), (0.0, 0.4)),
    ]
    masked = []
    with WidthMasker(model) as masker, torch.no_grad():
        for subnet in subnets:
            masker.use(subnet)
            masked.append(model(x))
        masker.use(None)
        full = model(x)
    with torch.no_grad():
        assert torch.equal(model(x), full)  # hooks are gone after the context
    for subnet, got in zip(subnets, masked, strict=True):
        h, channels = x, None
        for bounds, ratio in zip(subnet.slices, subnet.ratios, strict=True):
            s = PrunableSlice(ModelSlice(model, bounds), (0.0, ratio) if ratio else (0.0,))
            s.set_level(s.num_levels - 1)
            out = s(h, channels)
            h, channels = out.tensor, out.channels
        assert (got - h).abs().max().item() < 1e-5, subnet.describe()
        assert (got - full).abs().max().item() > 1e-3  # the sub-network really differs


def test_masks_follow_the_current_weights_after_refresh():
    model = _model("resnet-xs")
    with WidthMasker(model) as masker:
        stem = SliceBounds(0, model.num_blocks)
        before = masker.slice_masks(stem, 0.5).bn["blocks.0.bn"].tolist()
        dropped = sorted(set(range(16)) - set(before))
        with torch.no_grad():  # make a dropped stem channel the strongest
            model.blocks[0].conv.weight[dropped[0]] *= 100
        assert masker.slice_masks(stem, 0.5).bn["blocks.0.bn"].tolist() == before  # cached
        masker.refresh()
        after = masker.slice_masks(stem, 0.5).bn["blocks.0.bn"].tolist()
    assert dropped[0] in after
    assert after == sorted(_kept_by_prune_slice(model, 0.5)["blocks.0.bn"])


def test_sampler_follows_the_sandwich_rule():
    sampler = SubnetSampler(5, DEFAULT_RATIOS, random_subnets=2, mixed_prob=0.5, seed=1)
    seen_mixed = seen_uniform = 0
    for _ in range(200):
        subnets = sampler.sample()
        assert len(subnets) == 3
        assert subnets[0] == Subnet.uniform(5, 0.5)
        for s in subnets[1:]:
            assert not s.is_full
            assert s.slices[0].start == 0 and s.slices[-1].end == 5
            assert set(s.ratios) <= set(DEFAULT_RATIOS)
            if len(s.slices) > 1:
                seen_mixed += 1
                assert len(s.slices) <= 3
            else:
                seen_uniform += 1
                assert 0.0 < s.ratios[0] < 0.5
    assert seen_mixed > 100 and seen_uniform > 100
    a, b = SubnetSampler(5, seed=7), SubnetSampler(5, seed=7)
    assert [a.sample() for _ in range(10)] == [b.sample() for _ in range(10)]


def test_bad_subnets_and_samplers_are_rejected():
    with pytest.raises(ConfigError):
        Subnet((SliceBounds(0, 2), SliceBounds(3, 5)), (0.1, 0.2))
    with pytest.raises(ConfigError):
        Subnet((SliceBounds(0, 5),), (1.0,))
    with pytest.raises(ConfigError):
        SubnetSampler(5, (0.0,))
    model = _model("resnet-xs")
    with WidthMasker(model) as masker, pytest.raises(ConfigError):
        masker.use(Subnet((SliceBounds(0, 3),), (0.2,)))  # does not cover the model


def test_sub_network_passes_leave_running_statistics_alone():
    model = _model("resnet-xs").train()
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    x = torch.randn(8, 1, 28, 28)
    with frozen_bn_stats(model), torch.no_grad():
        model(x)
    after = {k: v for k, v in model.state_dict().items() if "running" in k}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(m.momentum == 0.1 for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_distillation_loss_is_zero_gradient_at_the_teacher():
    teacher = torch.randn(4, 10)
    student = teacher.clone().requires_grad_(True)
    distillation_loss(student, teacher).backward()
    assert student.grad is not None and student.grad.abs().max().item() < 1e-6


def test_sandwich_steps_train_the_smallest_sub_network():
    torch.manual_seed(0)
    model = build_model(preset("resnet-xs")).train()
    g = torch.Generator().manual_seed(0)
    # a learnable toy task: the class is which quadrant holds a bright square
    y = torch.randint(0, 4, (64,), generator=g)
    x = torch.randn(64, 1, 28, 28, generator=g) * 0.3
    for i, label in enumerate(y.tolist()):
        r, c = divmod(label, 2)
        x[i, 0, 14 * r + 3 : 14 * r + 11, 14 * c + 3 : 14 * c + 11] += 2.0
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sampler = SubnetSampler(model.num_blocks, seed=0)
    smallest = sampler.smallest

    def smallest_loss(masker: WidthMasker) -> float:
        masker.refresh()
        with frozen_bn_stats(model), torch.no_grad(), masker.subnet(smallest):
            return float(nn.functional.cross_entropy(model(x), y))

    with WidthMasker(model) as masker:
        start = smallest_loss(masker)
        for _ in range(12):
            masker.refresh()
            opt.zero_grad()
            result = sandwich_step(model, masker, sampler.sample(), x, y)
            opt.step()
            assert result.subnet_loss > 0
        end = smallest_loss(masker)
    assert end < 0.7 * start, (start, end)
