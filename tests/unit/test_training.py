"""Training configs, regimes, and short real training runs on a tiny synthetic dataset."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.checkpoint import load_checkpoint, save_checkpoint
from pipeline.data import ArrayDataset, split_dataset
from pipeline.errors import ConfigError
from pipeline.models import preset
from pipeline.placement import SliceBounds
from pipeline.reference import ComposedPipeline
from pipeline.training import (
    DEFAULT_REGIME,
    REGIMES,
    TrainConfig,
    accuracy,
    pruned_accuracy,
    regime,
    train_model,
)


def _toy_dataset(n: int = 300, seed: int = 0) -> ArrayDataset:
    """4 classes: a bright square in one quadrant of a noisy 28x28 grey image."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 4
    images = rng.integers(0, 60, size=(n, 28, 28)).astype(np.uint8)
    for i, label in enumerate(labels):
        r, c = divmod(int(label), 2)
        images[i, 14 * r + 3 : 14 * r + 11, 14 * c + 3 : 14 * c + 11] = 220
    return ArrayDataset(images, labels.astype(np.int64), ("a", "b", "c", "d"), "toy")


@pytest.fixture(scope="module")
def splits():
    return split_dataset(_toy_dataset(), val=0.2, test=0.2)


def _xs():
    return preset("resnet-xs", num_classes=4, class_names=("a", "b", "c", "d"))


def test_config_validation():
    with pytest.raises(ConfigError):
        TrainConfig(epochs=0)
    with pytest.raises(ConfigError):
        TrainConfig(width_robust=True, subnet_ratios=(0.0,))
    with pytest.raises(ConfigError):
        TrainConfig(subnet_ratios=(0.1, 0.2))  # levels start at 0
    with pytest.raises(ConfigError):
        TrainConfig(distill_weight=1.5)
    with pytest.raises(ConfigError):
        TrainConfig(mask_refresh=0)
    cfg = TrainConfig(subnet_ratios=[0, 0.25, 0.5])  # type: ignore[arg-type]
    assert cfg.subnet_ratios == (0.0, 0.25, 0.5)
    assert cfg.to_dict()["subnet_ratios"] == [0.0, 0.25, 0.5]


def test_regimes():
    assert DEFAULT_REGIME in REGIMES
    assert REGIMES["width-robust"].width_robust
    assert not REGIMES["standard"].width_robust and not REGIMES["paper-robust"].width_robust
    paper, standard = REGIMES["paper-robust"], REGIMES["standard"]
    assert paper.batch_size < standard.batch_size
    assert paper.weight_decay > standard.weight_decay
    cfg = regime("width-robust", epochs=3, batch_size=None)
    assert cfg.epochs == 3 and cfg.batch_size == REGIMES["width-robust"].batch_size
    assert cfg.regime == "width-robust"
    with pytest.raises(ConfigError):
        regime("nope")


def test_standard_training_still_works(splits):
    config = TrainConfig(epochs=1, batch_size=64, seed=0, calibration_images=32)
    ckpt = train_model(_xs(), splits, config, progress=False)
    assert len(ckpt.train["history"]) == 1
    assert "subnet_loss" not in ckpt.train["history"][0]
    assert ckpt.calibration_images is not None and len(ckpt.calibration_images) == 32


def test_width_robust_training_writes_a_checkpoint_that_loads(splits, tmp_path):
    config = regime("width-robust", epochs=2, batch_size=32, calibration_images=64, mask_refresh=2)
    ckpt = train_model(_xs(), splits, config, progress=False)
    history = ckpt.train["history"]
    assert [row["epoch"] for row in history] == [1, 2]
    assert all(row["subnet_loss"] > 0 and 0 <= row["val_acc_ratio_0.5"] <= 1 for row in history)
    assert ckpt.train["cpu_seconds"] > 0
    path = save_checkpoint(ckpt, tmp_path / "wr.pt")
    loaded = load_checkpoint(path)
    assert loaded.train["config"]["width_robust"] is True
    assert loaded.train["config"]["subnet_ratios"] == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
    x = loaded.preprocess(splits.test.images)
    y = torch.from_numpy(splits.test.labels)
    with torch.no_grad():
        assert torch.equal(loaded.build()(x), ckpt.build()(x))
    # the per-epoch check measures what a node runs: the composed pipeline, BN re-estimated
    pipe = ComposedPipeline(loaded, [SliceBounds(0, loaded.build().num_blocks)], ratios=(0.0, 0.5))
    pipe.set_levels([1])
    model = loaded.build()
    assert pruned_accuracy(model, 0.5, loaded.calibration_tensor(), x, y) == accuracy(pipe, x, y)
