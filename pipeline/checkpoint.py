"""Checkpoints: weights plus everything that made them, so loading needs nothing else.

A checkpoint is a ``torch.save`` dict read back with ``weights_only=True`` (no pickle of
arbitrary objects): the model config, the preprocessing, the weights, the training config and
metrics, the library versions, and a small set of training images used to re-estimate
BatchNorm statistics of pruned variants.
"""

from __future__ import annotations

import hashlib
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.data import Preprocess
from pipeline.errors import CheckpointError
from pipeline.models import ResNetConfig, SliceableResNet, build_model

FORMAT = "edgeprune-checkpoint"
FORMAT_VERSION = 1
# The default model, shipped as package data: in a checkout (and an editable install)
# default_model/resnet-s.pt is a link to models/resnet-s.pt, which this resolves to; in a
# non-editable install it is the copy the wheel carries.
DEFAULT_CHECKPOINT = (Path(__file__).resolve().parent / "default_model" / "resnet-s.pt").resolve()


@dataclass
class Checkpoint:
    config: ResNetConfig
    preprocess: Preprocess
    state_dict: dict[str, torch.Tensor]
    train: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    calibration_images: np.ndarray | None = None  # uint8 [N, H, W(, C)]
    versions: dict[str, str] = field(default_factory=dict)
    path: Path | None = None

    def build(self) -> SliceableResNet:
        model = build_model(self.config)
        try:
            model.load_state_dict(self.state_dict)
        except RuntimeError as exc:
            raise CheckpointError(f"weights do not fit the stored config: {exc}") from exc
        return model.eval()

    def calibration_tensor(self, limit: int | None = None) -> torch.Tensor | None:
        if self.calibration_images is None:
            return None
        images = self.calibration_images[:limit] if limit else self.calibration_images
        return self.preprocess(images)

    def model_hash(self) -> str:
        """A short, stable hash of the weights (calibration files and plans refer to it)."""
        h = hashlib.sha256()
        for key in sorted(self.state_dict):
            h.update(key.encode())
            h.update(self.state_dict[key].detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]


def save_checkpoint(ckpt: Checkpoint, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    versions = {"torch": str(torch.__version__), "python": platform.python_version()}
    try:
        import torch_pruning

        versions["torch_pruning"] = str(torch_pruning.__version__)
    except ImportError:  # pragma: no cover - a declared dependency
        pass
    from edgeprune import __version__

    versions["edgeprune"] = __version__
    payload: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": ckpt.config.to_dict(),
        "preprocess": ckpt.preprocess.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in ckpt.state_dict.items()},
        "train": ckpt.train,
        "metrics": ckpt.metrics,
        "versions": versions,
    }
    if ckpt.calibration_images is not None:
        payload["calibration_images"] = torch.from_numpy(
            np.ascontiguousarray(ckpt.calibration_images)
        )
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    ckpt.path = path
    ckpt.versions = versions
    return path


def load_checkpoint(path: Path | str | None = None) -> Checkpoint:
    path = Path(path) if path else DEFAULT_CHECKPOINT
    if not path.exists():
        hint = " (train one with `edgeprune train`)" if path == DEFAULT_CHECKPOINT else ""
        raise CheckpointError(f"checkpoint {path} does not exist{hint}")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an edgeprune checkpoint")
    if raw.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {raw.get('format_version')}, "
            f"this edgeprune reads {FORMAT_VERSION}"
        )
    cal = raw.get("calibration_images")
    return Checkpoint(
        config=ResNetConfig.from_dict(raw["config"]),
        preprocess=Preprocess(**raw["preprocess"]),
        state_dict=raw["state_dict"],
        train=raw.get("train", {}),
        metrics=raw.get("metrics", {}),
        calibration_images=cal.numpy() if cal is not None else None,
        versions=raw.get("versions", {}),
        path=path,
    )
