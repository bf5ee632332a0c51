"""Pruning levels that differ across a cut: the downstream slice must still work.

A slice pruned upstream sends only its kept channels; downstream, the missing ones are zeros.
BatchNorm statistics are therefore kept per (own level, upstream level) pair. Measured on the
default trained model and real validation images.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint
from pipeline.data import load_dataset, split_dataset
from pipeline.reference import ComposedPipeline
from pipeline.slicing import parse_cuts
from pipeline.training import accuracy
from tests.helpers import DATA_DIR


@pytest.fixture(scope="module")
def val():
    ckpt = load_checkpoint(DEFAULT_CHECKPOINT)
    ds = split_dataset(load_dataset("animal-mnist", DATA_DIR)).val
    return ckpt, ckpt.preprocess(ds.images[:500]), torch.from_numpy(ds.labels[:500])


def test_mismatched_levels_across_a_cut_keep_accuracy(val):
    ckpt, x, y = val
    pipe = ComposedPipeline(ckpt, parse_cuts("2", 5))
    pipe.set_levels([0, 0])
    base = accuracy(pipe, x, y)
    for levels in ([5, 0], [0, 5], [5, 5], [2, 4]):
        pipe.set_levels(levels)
        assert accuracy(pipe, x, y) >= base - 0.05, levels


def test_without_upstream_statistics_a_pruned_upstream_hurts(val):
    """The control: one statistics set per level (as if upstream were never pruned)."""
    ckpt, x, y = val
    pipe = ComposedPipeline(ckpt, parse_cuts("2", 5))
    pipe.set_levels([5, 0])
    upstream_aware = accuracy(pipe, x, y)
    second = pipe.slices[1]
    first_out = pipe.slices[0](x)
    naive = second(first_out.tensor, first_out.channels, None)  # upstream level unknown
    naive_acc = float((naive.tensor.argmax(1) == y).float().mean())
    assert upstream_aware > naive_acc + 0.1
