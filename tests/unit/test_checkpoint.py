"""Checkpoints: a save/load round trip carries everything, the weight hash, and loading refuses
anything that is not an edgeprune checkpoint (including arbitrary pickles)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.checkpoint import FORMAT, FORMAT_VERSION, Checkpoint, load_checkpoint, save_checkpoint
from pipeline.data import Preprocess
from pipeline.errors import CheckpointError
from pipeline.models import build_model, preset


class _Evil:
    """Unpickling this runs a shell command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (self.command,)


def _checkpoint(seed: int = 0, *, calibration: bool = True) -> Checkpoint:
    torch.manual_seed(seed)
    config = preset("resnet-xs", class_names=tuple(f"class{i}" for i in range(10)))
    model = build_model(config).eval()
    images = np.random.default_rng(seed).integers(0, 256, (8, 28, 28)).astype(np.uint8)
    return Checkpoint(
        config=config,
        preprocess=Preprocess(mean=0.2, std=0.3, size=28, channels=1),
        state_dict={k: v.clone() for k, v in model.state_dict().items()},
        train={"config": {"epochs": 3, "lr": 0.05}, "seconds": 1.5},
        metrics={"val_acc": 0.5, "history": [{"epoch": 1, "loss": 2.0}]},
        calibration_images=images if calibration else None,
    )


def test_round_trip_carries_config_preprocess_weights_and_calibration(tmp_path):
    ckpt = _checkpoint()
    path = save_checkpoint(ckpt, tmp_path / "sub" / "m.pt")
    assert path.exists() and ckpt.path == path
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.pt"]  # no temp file left
    got = load_checkpoint(path)
    assert got.path == path
    assert got.config == ckpt.config and got.config.class_names == ckpt.config.class_names
    assert got.preprocess == ckpt.preprocess
    assert got.train == ckpt.train and got.metrics == ckpt.metrics
    assert got.state_dict.keys() == ckpt.state_dict.keys()
    for key, value in ckpt.state_dict.items():
        assert torch.equal(got.state_dict[key], value), key
    assert got.calibration_images is not None and ckpt.calibration_images is not None
    assert got.calibration_images.dtype == np.uint8
    np.testing.assert_array_equal(got.calibration_images, ckpt.calibration_images)
    calib = got.calibration_tensor(limit=3)
    assert calib is not None and calib.shape == (3, 1, 28, 28)
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(got.build()(x), ckpt.build()(x))


def test_versions_are_plain_strings(tmp_path):
    path = save_checkpoint(_checkpoint(), tmp_path / "m.pt")
    versions = load_checkpoint(path).versions
    assert {"torch", "python", "torch_pruning", "edgeprune"} <= versions.keys()
    # torch.__version__ is a str subclass that a weights_only load would refuse
    assert all(type(v) is str for v in versions.values()), versions
    assert versions["torch"] == str(torch.__version__)
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == FORMAT and raw["format_version"] == FORMAT_VERSION


def test_without_calibration_images(tmp_path):
    got = load_checkpoint(save_checkpoint(_checkpoint(calibration=False), tmp_path / "m.pt"))
    assert got.calibration_images is None and got.calibration_tensor() is None


def test_model_hash_is_stable_and_follows_the_weights(tmp_path):
    ckpt = _checkpoint()
    h = ckpt.model_hash()
    assert len(h) == 16 and int(h, 16) >= 0
    assert ckpt.model_hash() == h
    assert load_checkpoint(save_checkpoint(ckpt, tmp_path / "m.pt")).model_hash() == h
    assert _checkpoint(seed=0).model_hash() == h  # same weights from scratch
    assert _checkpoint(seed=1).model_hash() != h
    key = next(k for k in ckpt.state_dict if k.endswith("conv.weight"))
    ckpt.state_dict[key] = ckpt.state_dict[key].clone()
    ckpt.state_dict[key].view(-1)[0] += 1e-6
    assert ckpt.model_hash() != h


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


def test_a_file_that_is_not_a_torch_file(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_text("hello, I am not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(bad)


@pytest.mark.parametrize(
    "payload",
    [
        {"state_dict": {}},
        {"format": "something-else", "format_version": 1},
        [1, 2, 3],
    ],
)
def test_a_torch_file_that_is_not_an_edgeprune_checkpoint(tmp_path, payload):
    path = tmp_path / "other.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="not an edgeprune checkpoint"):
        load_checkpoint(path)


def test_a_wrong_format_version(tmp_path):
    path = save_checkpoint(_checkpoint(), tmp_path / "m.pt")
    raw = torch.load(path, weights_only=True)
    raw["format_version"] = FORMAT_VERSION + 1
    torch.save(raw, path)
    with pytest.raises(CheckpointError, match=f"format {FORMAT_VERSION + 1}"):
        load_checkpoint(path)


def test_loading_never_runs_arbitrary_pickles(tmp_path, capfd):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save(
        {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "config": _Evil(f"echo pwned > {marker}"),
        },
        path,
    )
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(path)
    assert not marker.exists()
    assert "pwned" not in capfd.readouterr().out


def test_weights_that_do_not_fit_the_config(tmp_path):
    ckpt = _checkpoint()
    other = build_model(preset("resnet-xs", widths=(8, 16, 32)))
    ckpt.state_dict = dict(other.state_dict())
    got = load_checkpoint(save_checkpoint(ckpt, tmp_path / "m.pt"))
    with pytest.raises(CheckpointError, match="do not fit"):
        got.build()


def test_default_checkpoint_is_loadable_when_present():
    from pipeline.checkpoint import DEFAULT_CHECKPOINT

    if not Path(DEFAULT_CHECKPOINT).exists():
        pytest.skip("no trained default checkpoint in models/")
    ckpt = load_checkpoint()
    assert ckpt.path == DEFAULT_CHECKPOINT
    assert ckpt.build().num_blocks == 2 + sum(ckpt.config.depths)
    assert all(type(v) is str for v in ckpt.versions.values())
