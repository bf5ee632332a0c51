"""Slicing and run-time pruning on real (randomly initialised) models with Torch-Pruning."""

from __future__ import annotations

import itertools

import pytest
import torch

from pipeline.models import build_model, preset
from pipeline.placement import SliceBounds
from pipeline.pruning import (
    DEFAULT_RATIOS,
    PrunableSlice,
    kept_channels,
    prune_slice,
    scatter_channels,
)
from pipeline.slicing import ModelSlice, even_cuts, parse_cuts, slice_model


def _randomise_bn(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    m = build_model(preset("resnet-s")).eval()
    _randomise_bn(m)
    return m


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(6, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def _run(slices: list[PrunableSlice], x: torch.Tensor) -> torch.Tensor:
    channels = None
    for s in slices:
        out = s(x, channels)
        x, channels = out.tensor, out.channels
    return x


@pytest.mark.parametrize("n_slices", [2, 3, 4])
def test_level0_slices_compose_to_the_whole_model(model, images, n_slices):
    slices = [PrunableSlice(s) for s in slice_model(model, even_cuts(model.num_blocks, n_slices))]
    with torch.no_grad():
        expected = model(images)
    got = _run(slices, images)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-5


def test_resnet18_cifar_layout_slices_compose(images):
    torch.manual_seed(0)
    m = build_model(preset("resnet18-cifar")).eval()
    assert m.num_blocks == 10  # stem, 8 basic blocks, head
    x = torch.randn(2, 3, 32, 32)
    slices = [PrunableSlice(s, ratios=(0.0, 0.25)) for s in slice_model(m, parse_cuts("3,7", 10))]
    with torch.no_grad():
        expected = m(x)
    assert (_run(slices, x) - expected).abs().max().item() < 1e-4
    for s in slices:
        s.set_level(1)
    assert _run(slices, x).shape == expected.shape


def test_boundary_round_trip_is_exact(model, images):
    first = ModelSlice(model, SliceBounds(0, 2))
    variant = prune_slice(first, 0.3)
    with torch.no_grad():
        full = first(images)
        kept = variant.module(images)
    assert variant.out_channels is not None
    assert kept.shape[1] == len(variant.out_channels) < full.shape[1]
    restored = scatter_channels(kept, variant.out_channels, full.shape[1])
    # the kept channels are bit-identical to the same channels computed by hand, the rest zero
    assert torch.equal(restored.index_select(1, variant.out_channels), kept)
    dropped = sorted(set(range(full.shape[1])) - set(variant.out_channels.tolist()))
    assert torch.count_nonzero(restored[:, dropped]) == 0
    # scatter then gather gives back exactly what was sent
    assert torch.equal(restored[:, variant.out_channels], kept)


def test_level0_sends_full_width_without_indices(model, images):
    s = PrunableSlice(ModelSlice(model, SliceBounds(0, 2)))
    out = s(images)
    assert out.channels is None and out.tensor.shape[1] == out.full_channels == 80


@pytest.mark.parametrize("cuts", ["2", "1,3", "1,2,3"])
def test_every_level_has_fewer_macs_than_the_level_below(model, cuts):
    for ms in slice_model(model, parse_cuts(cuts, model.num_blocks)):
        macs = [v.macs for v in PrunableSlice(ms).variants]
        assert all(b < a for a, b in itertools.pairwise(macs)), (ms.bounds, macs)


def test_classifier_outputs_are_never_pruned(model, images):
    last = PrunableSlice(ModelSlice(model, SliceBounds(3, 5)))
    x = torch.randn(3, 160, 7, 7)
    for level in range(last.num_levels):
        last.set_level(level)
        out = last(x)
        assert out.tensor.shape == (3, 10) and out.channels is None


def test_switching_levels_back_and_forth_is_bit_identical(model, images):
    slices = [PrunableSlice(s) for s in slice_model(model, parse_cuts("2,3", 5))]
    seen: dict[int, torch.Tensor] = {}
    for level in [0, 3, 5, 1, 3, 0, 5, 1]:
        for s in slices:
            s.set_level(level)
        out = _run(slices, images)
        if level in seen:
            assert torch.equal(out, seen[level])
        seen[level] = out
    assert not torch.equal(seen[0], seen[5])


def test_kept_channel_counts_round_to_multiples():
    assert [kept_channels(80, r, 8) for r in DEFAULT_RATIOS] == [80, 72, 64, 56, 48, 40]
    assert kept_channels(64, 0.3, 8) == 48  # 44.8 rounds to the nearest multiple
    assert kept_channels(16, 0.9, 8) == 8  # never below one multiple
    assert kept_channels(10, 0.5, 1) == 5


def test_pruned_channels_are_the_lowest_l1_ones(model):
    ms = ModelSlice(model, SliceBounds(0, 1))  # the stem alone: conv -> bn (+ output boundary)
    variant = prune_slice(ms, 0.5)
    stem = ms.body[0]
    # group score: mean over the coupled layers of each channel's L1 norm (the boundary
    # adapter adds the same 1 to every channel, so it does not change the ranking)
    score = stem.conv.weight.detach().abs().flatten(1).sum(1) + stem.bn.weight.detach().abs()
    expected = set(torch.argsort(score, descending=True)[:40].tolist())
    assert variant.out_channels is not None
    assert set(variant.out_channels.tolist()) == expected


def test_bad_levels_are_rejected(model):
    from pipeline.errors import ConfigError

    ms = ModelSlice(model, SliceBounds(0, 2))
    with pytest.raises(ConfigError):
        PrunableSlice(ms, ratios=(0.1, 0.2))
    with pytest.raises(ConfigError):
        PrunableSlice(ms, ratios=(0.0, 0.3, 0.2))
    s = PrunableSlice(ms, ratios=(0.0, 0.5))
    with pytest.raises(ConfigError):
        s.set_level(2)
    with pytest.raises(ConfigError):
        parse_cuts("3,2", 5)
    with pytest.raises(ConfigError):
        parse_cuts("0,2", 5)
