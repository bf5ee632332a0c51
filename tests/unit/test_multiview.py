"""Multi-view model: views, max fusion with views missing, pruned branches that match the
unpruned model at level 0, checkpoint round trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data import Preprocess
from pipeline.errors import ConfigError
from pipeline.multiview import (
    VIEWS,
    MultiViewCheckpoint,
    MultiViewConfig,
    MultiViewNet,
    PrunedMultiView,
    ViewSpec,
    _present_mask,
    fuse_features,
)

ROOT = Path(__file__).resolve().parents[2]


def _ckpt(seed: int = 0) -> MultiViewCheckpoint:
    torch.manual_seed(seed)
    cfg = MultiViewConfig()
    net = MultiViewNet(cfg).eval()
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (64, 28, 28), dtype=np.uint8)
    return MultiViewCheckpoint(
        cfg, Preprocess(0.2, 0.3, 20, 1), net.state_dict(), calibration_images=images
    )


def test_views_are_distinct_crops() -> None:
    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    crops = [v.crop(images) for v in VIEWS]
    assert all(c.shape == (2, 20, 20) for c in crops)
    assert np.array_equal(crops[0], images[:, 4:24, 0:20])
    assert np.array_equal(crops[2], images[:, 0:20, 4:24][:, :, ::-1])
    assert not np.array_equal(crops[0], crops[1])
    with pytest.raises(ConfigError):
        ViewSpec("bad", 20, 20, 20).crop(images)


def test_fusion_is_an_elementwise_max_over_present_views() -> None:
    f = torch.tensor([[[1.0, 5.0], [3.0, 2.0], [0.0, 9.0]]])
    assert fuse_features(f, None).tolist() == [[3.0, 9.0]]
    assert fuse_features(f, torch.tensor([[True, True, False]])).tolist() == [[3.0, 5.0]]
    gen = torch.Generator().manual_seed(0)
    mask = _present_mask(500, 3, 1.0, gen)
    assert mask.any(dim=1).all() and not mask.all(dim=1).all()


def test_pruned_branches_match_the_model_and_views_can_be_missing() -> None:
    ckpt = _ckpt()
    net = ckpt.build()
    images = np.random.default_rng(1).integers(0, 256, (16, 28, 28), dtype=np.uint8)
    views = ckpt.view_tensors(images)
    pruned = PrunedMultiView(ckpt)
    with torch.no_grad():
        full = net(views)
        outs = [pruned.branch(v, x, 0) for v, x in enumerate(views)]
        assert torch.allclose(pruned.fuse(outs), full, atol=1e-5)
        for v in range(3):  # a missing view: the max over the others
            present = torch.ones(16, 3, dtype=torch.bool)
            present[:, v] = False
            partial = [o if u != v else None for u, o in enumerate(outs)]
            assert torch.allclose(pruned.fuse(partial), net(views, present), atol=1e-5)
        feat, channels = pruned.branch(0, views[0], 5)
        assert channels is not None and feat.shape == (16, len(channels)) and len(channels) < 64
    with pytest.raises(ConfigError):
        pruned.fuse([None, None, None])
    t, mem = pruned.branch_costs(runs=3, warmup=1)
    assert t.shape == mem.shape == (3, 6) and (mem[:, -1] < mem[:, 0]).all()


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    ckpt = _ckpt()
    path = ckpt.save(tmp_path / "mv.pt")
    back = MultiViewCheckpoint.load(path)
    assert back.config == ckpt.config and back.preprocess == ckpt.preprocess
    assert all(torch.equal(back.state_dict[k], v) for k, v in ckpt.state_dict.items())
    assert np.array_equal(back.calibration_images, ckpt.calibration_images)  # type: ignore[arg-type]


def test_the_shipped_multiview_checkpoint_is_small_and_loads() -> None:
    path = ROOT / "models" / "multiview-xs.pt"
    if not path.exists():
        pytest.skip("models/multiview-xs.pt not trained yet (edgeprune bench planner --train)")
    assert path.stat().st_size < 5 * 2**20
    ckpt = MultiViewCheckpoint.load(path)
    assert ckpt.metrics["val_acc"] > 0.5 and len(ckpt.config.views) == 3
