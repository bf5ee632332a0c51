"""A multi-view CNN (MVCNN-style) for SlimEdge: one branch per view, element-wise max fusion.

Views. A deployment has one camera per view; here the views are cut from one 28 x 28 image
(:data:`VIEWS`): a left crop, a right crop and a top crop mirrored, each 20 x 20, so every
view sees part of the animal and no view sees all of it.

Model (:class:`MultiViewNet`). View v has its own branch: a
:class:`~pipeline.models.SliceableResNet` trunk (stem and residual blocks; its head is not
used) with its own weights, then a global average pool::

    view v [B, 1, 20, 20] -> trunk_v -> [B, C, 3, 3] -> mean over H, W -> feature_v [B, C]
    fused = max_v feature_v  (element-wise, over the views present)  -> Linear -> logits [B, K]

A lost view is left out of the max; training drops views at random (each sample keeps a random
non-empty subset with probability ``view_dropout``) so the classifier works on any subset.

Pruning (:class:`PrunedMultiView`): each branch is the slice ``[0, n - 1)`` of its trunk, a
:class:`~pipeline.pruning.PrunableSlice` with its own levels (BatchNorm re-estimated on that
view's calibration crops). A pruned branch emits only its kept channels and their indices;
fusion scatters them back to full width (zeros elsewhere) before the max.

Per-view levels (:func:`view_levels`): the branches run in parallel, each on its camera's
device, so the exact choice over ``L^V`` level vectors minimises the slowest branch.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from pipeline.calibration.timing import peak_bytes, time_calls, torch_threads
from pipeline.data import Preprocess, Splits
from pipeline.devices import Device
from pipeline.errors import CheckpointError, ConfigError
from pipeline.models import ResNetConfig, SliceableResNet
from pipeline.placement import SliceBounds
from pipeline.pruning import DEFAULT_RATIOS, PrunableSlice, scatter_channels, validate_ratios
from pipeline.slicing import ModelSlice
from pipeline.training import augment_batch

FORMAT = "edgeprune-multiview"


@dataclass(frozen=True)
class ViewSpec:
    """A square crop of the source image at (top, left), optionally mirrored."""

    name: str
    top: int
    left: int
    size: int
    flip: bool = False

    def crop(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W] -> [N, size, size]."""
        out = images[:, self.top : self.top + self.size, self.left : self.left + self.size]
        if out.shape[1:] != (self.size, self.size):
            raise ConfigError(f"view {self.name} does not fit images of shape {images.shape}")
        return np.ascontiguousarray(out[:, :, ::-1] if self.flip else out)


VIEWS = (
    ViewSpec("left", 4, 0, 20),
    ViewSpec("right", 4, 8, 20),
    ViewSpec("top-flipped", 0, 4, 20, flip=True),
)


@dataclass(frozen=True)
class MultiViewConfig:
    trunk: ResNetConfig = field(
        default_factory=lambda: ResNetConfig(
            name="mv-trunk-xs", widths=(16, 32, 64), depths=(1, 1, 1), input_size=20
        )
    )
    views: tuple[ViewSpec, ...] = VIEWS
    round_to: int = 4  # narrow layers: 4 keeps the six levels distinct

    def __post_init__(self) -> None:
        if not self.views or any(v.size != self.trunk.input_size for v in self.views):
            raise ConfigError("every view must be trunk.input_size square")

    def to_dict(self) -> dict[str, Any]:
        return {
            "trunk": self.trunk.to_dict(),
            "views": [asdict(v) for v in self.views],
            "round_to": self.round_to,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MultiViewConfig:
        return cls(
            ResNetConfig.from_dict(d["trunk"]),
            tuple(ViewSpec(**v) for v in d["views"]),
            int(d.get("round_to", 4)),
        )


def fuse_features(features: torch.Tensor, present: torch.Tensor | None) -> torch.Tensor:
    """Element-wise max over views: features [B, V, C], present [B, V] bool -> [B, C]."""
    if present is not None:
        features = features.masked_fill(~present[:, :, None], -math.inf)
    return features.max(dim=1).values


class MultiViewNet(nn.Module):
    """Per-view trunks, max fusion, linear classifier (see the module docstring)."""

    def __init__(self, config: MultiViewConfig) -> None:
        super().__init__()
        self.config = config
        self.branches = nn.ModuleList(SliceableResNet(config.trunk) for _ in config.views)
        self.classifier = nn.Linear(config.trunk.widths[-1], config.trunk.num_classes)

    def branch(self, v: int) -> SliceableResNet:
        return cast(SliceableResNet, self.branches[v])

    @property
    def trunk_end(self) -> int:
        """Blocks ``[0, trunk_end)`` of a branch model form the trunk (the head is unused)."""
        return self.branch(0).num_blocks - 1

    def features(self, v: int, x: torch.Tensor) -> torch.Tensor:
        """View v's feature: [B, 1, S, S] -> [B, C]."""
        for block in self.branch(v).blocks[: self.trunk_end]:
            x = block(x)
        return x.mean(dim=(2, 3))

    def forward(
        self, views: Sequence[torch.Tensor], present: torch.Tensor | None = None
    ) -> torch.Tensor:
        feats = torch.stack([self.features(v, x) for v, x in enumerate(views)], dim=1)
        return self.classifier(fuse_features(feats, present))


@dataclass
class MultiViewCheckpoint:
    config: MultiViewConfig
    preprocess: Preprocess
    state_dict: dict[str, torch.Tensor]
    metrics: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    calibration_images: np.ndarray | None = None  # uint8 source images [N, 28, 28]

    def build(self) -> MultiViewNet:
        net = MultiViewNet(self.config)
        net.load_state_dict(self.state_dict)
        return net.eval()

    def view_tensors(self, images: np.ndarray) -> list[torch.Tensor]:
        return [self.preprocess(v.crop(images)) for v in self.config.views]

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "format": FORMAT,
            "config": self.config.to_dict(),
            "preprocess": self.preprocess.to_dict(),
            "state_dict": self.state_dict,
            "metrics": self.metrics,
            "train": self.train,
            "calibration_images": None
            if self.calibration_images is None
            else torch.from_numpy(self.calibration_images),
        }
        torch.save(payload, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> MultiViewCheckpoint:
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for a bad file
            raise CheckpointError(f"cannot read multi-view checkpoint {path}: {exc}") from exc
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise CheckpointError(f"{path} is not a multi-view checkpoint")
        cal = raw.get("calibration_images")
        return cls(
            MultiViewConfig.from_dict(raw["config"]),
            Preprocess(**raw["preprocess"]),
            raw["state_dict"],
            raw.get("metrics", {}),
            raw.get("train", {}),
            None if cal is None else cal.numpy(),
        )


@dataclass(frozen=True)
class MultiViewTraining:
    epochs: int = 8
    batch_size: int = 64
    lr: float = 0.05
    weight_decay: float = 5e-4
    view_dropout: float = 0.5  # probability a sample trains on a random subset of its views
    seed: int = 0
    calibration_images: int = 256


def _present_mask(b: int, v: int, p: float, gen: torch.Generator) -> torch.Tensor:
    """[b, v] bool: all views, or (with probability p) a random non-empty subset."""
    keep = torch.rand(b, v, generator=gen) < 0.5
    keep[torch.arange(b), torch.randint(0, v, (b,), generator=gen)] = True
    return torch.where((torch.rand(b, generator=gen) < p)[:, None], keep, torch.ones_like(keep))


def train_multiview(
    config: MultiViewConfig, splits: Splits, settings: MultiViewTraining, *, progress: bool = True
) -> MultiViewCheckpoint:
    """Train all branches and the classifier jointly (SGD, one-cycle, view dropout)."""
    from tqdm import tqdm

    torch.manual_seed(settings.seed)
    gen = torch.Generator().manual_seed(settings.seed)
    pre = Preprocess.fit(splits.train, config.trunk.input_size)
    xs = [pre(v.crop(splits.train.images)) for v in config.views]
    y = torch.from_numpy(splits.train.labels)
    net = MultiViewNet(config)
    opt = torch.optim.SGD(
        net.parameters(),
        lr=settings.lr,
        momentum=0.9,
        nesterov=True,
        weight_decay=settings.weight_decay,
    )
    steps = math.ceil(len(y) / settings.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, settings.lr, total_steps=steps * settings.epochs, pct_start=0.15
    )
    started, history = time.perf_counter(), []
    ckpt = MultiViewCheckpoint(config, pre, {})
    for epoch in range(settings.epochs):
        net.train()
        perm = torch.randperm(len(y), generator=gen)
        for step in tqdm(
            range(steps),
            desc=f"epoch {epoch + 1}/{settings.epochs}",
            disable=not progress,
            leave=False,
        ):
            idx = perm[step * settings.batch_size : (step + 1) * settings.batch_size]
            views = [augment_batch(x[idx], gen, pad=1) for x in xs]
            present = _present_mask(len(idx), len(views), settings.view_dropout, gen)
            loss = nn.functional.cross_entropy(net(views, present), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        ckpt.state_dict = {k: v.detach().clone() for k, v in net.state_dict().items()}
        val = evaluate(
            ckpt.build(), ckpt.view_tensors(splits.val.images), torch.from_numpy(splits.val.labels)
        )
        history.append(
            {"epoch": epoch + 1, "val_acc": val, "elapsed_s": time.perf_counter() - started}
        )
    rng = np.random.default_rng(settings.seed)
    cal = rng.choice(len(y), size=min(settings.calibration_images, len(y)), replace=False)
    ckpt.calibration_images = splits.train.images[np.sort(cal)]
    ckpt.metrics = {"val_acc": history[-1]["val_acc"]}
    ckpt.train = {
        "settings": asdict(settings),
        "history": history,
        "seconds": time.perf_counter() - started,
        "threads": torch.get_num_threads(),
    }
    return ckpt


@torch.no_grad()
def evaluate(
    net: MultiViewNet,
    views: Sequence[torch.Tensor],
    y: torch.Tensor,
    present: Sequence[bool] | None = None,
) -> float:
    """Accuracy of the unpruned model with views ``present`` (default: all)."""
    mask = None if present is None else torch.tensor(present).expand(len(y), -1)
    return float((net(views, mask).argmax(1) == y).float().mean())


class PrunedMultiView:
    """Every branch as a :class:`PrunableSlice` (all levels built) plus the fusion classifier.

    What the branch nodes and the fusion node run; :meth:`accuracy` measures configurations.
    """

    def __init__(self, ckpt: MultiViewCheckpoint, ratios: Sequence[float] = DEFAULT_RATIOS) -> None:
        self.ckpt = ckpt
        self.net = ckpt.build()
        self.ratios = validate_ratios(ratios)
        self.width = ckpt.config.trunk.widths[-1]
        bounds = SliceBounds(0, self.net.trunk_end)
        cal = (
            None if ckpt.calibration_images is None else ckpt.view_tensors(ckpt.calibration_images)
        )
        self.branches = [
            PrunableSlice(
                ModelSlice(self.net.branch(v), bounds),
                self.ratios,
                round_to=ckpt.config.round_to,
                calibration_inputs=None if cal is None else cal[v],
            )
            for v in range(len(ckpt.config.views))
        ]

    @torch.no_grad()
    def branch(
        self, v: int, x: torch.Tensor, level: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """View v at ``level``: [B, 1, S, S] -> pooled kept channels [B, k] and their indices."""
        s = self.branches[v]
        s.set_level(level)
        out = s(x)
        return out.tensor.mean(dim=(2, 3)), out.channels

    @torch.no_grad()
    def fuse(
        self, outputs: Sequence[tuple[torch.Tensor, torch.Tensor | None] | None]
    ) -> torch.Tensor:
        """Logits from the views that arrived (None: view missing); at least one needed."""
        feats = [
            scatter_channels(f, ch, self.width) for o in outputs if o is not None for f, ch in [o]
        ]
        if not feats:
            raise ConfigError("fusion needs at least one view")
        return self.net.classifier(torch.stack(feats, dim=1).max(dim=1).values)

    @torch.no_grad()
    def accuracy(
        self,
        views: Sequence[torch.Tensor],
        y: torch.Tensor,
        levels: Sequence[int],
        present: Sequence[bool] | None = None,
    ) -> float:
        present = present or [True] * len(views)
        outs = [
            self.branch(v, x, lv) if p else None
            for v, (x, lv, p) in enumerate(zip(views, levels, present, strict=True))
        ]
        return float((self.fuse(outs).argmax(1) == y).float().mean())

    def branch_costs(self, runs: int = 50, warmup: int = 5) -> tuple[np.ndarray, np.ndarray]:
        """Per view, per level: median branch CPU time (batch 1, one thread) and memory bytes
        (parameters + input + 2 x the largest intermediate, as ``pipeline.profiling``)."""
        n_views, n_levels = len(self.branches), len(self.ratios)
        t, mem = np.zeros((n_views, n_levels)), np.zeros((n_views, n_levels))
        x = torch.zeros(1, *self.branches[0].model_slice.in_shape)
        with torch_threads(1):
            for v, s in enumerate(self.branches):
                fns = [(lambda m=var.module: m(x)) for var in s.variants]
                t[v] = [c.median("cpu") for c in time_calls(fns, runs=runs, warmup=warmup)]
                mem[v] = [
                    var.params * 4 + x.numel() * 4 + 2 * peak_bytes(var.module, x)[0]
                    for var in s.variants
                ]
        return t, mem


def view_levels(
    time_s: np.ndarray,
    memory_bytes: np.ndarray,
    devices: Sequence[Device],
    accuracy: Callable[[np.ndarray], np.ndarray],
    floor: float,
    fusion_s: float = 0.0,
) -> tuple[tuple[int, ...], float, float] | None:
    """Per-view levels of a multi-view model: view v's branch runs on ``devices[v]`` (its
    camera's device), all in parallel, then fusion (``fusion_s``, not pruned). Exact over
    ``L^V``: the smallest bottleneck ``max(max_v time[v, l_v] / speed_v, fusion_s)`` with each
    branch in its device's memory and ``accuracy(levels [C, V]) >= floor`` (e.g. an
    importance model over views: ``pipeline.calibration.accuracy.AccuracyModel.predict_views``).
    Returns ``(levels, bottleneck_s, accuracy)``, or None when nothing qualifies."""
    n_views, n_levels = np.shape(time_s)
    if len(devices) != n_views:
        raise ConfigError(f"{n_views} views need {n_views} devices, got {len(devices)}")
    combos = np.asarray(list(itertools.product(range(n_levels), repeat=n_views)))
    views = np.arange(n_views)
    speeds = []
    for d in devices:  # a device's own profile is of the chain model, not of a branch
        if d.speed is None:
            raise ConfigError(f"device {d.name!r}: per-view levels need its speed")
        speeds.append(d.speed)
    t = np.asarray(time_s)[views, combos] / np.asarray(speeds)
    fits = (
        np.asarray(memory_bytes)[views, combos]
        <= np.asarray([d.memory_mb * 2**20 for d in devices])
    ).all(axis=1)
    acc = np.asarray(accuracy(combos))
    bottleneck = np.maximum(t.max(axis=1), fusion_s)
    ok = np.flatnonzero(fits & (acc >= floor - 1e-12))
    if ok.size == 0:
        return None
    best = ok[np.lexsort((combos[ok].sum(axis=1), -acc[ok], bottleneck[ok]))[0]]
    return tuple(int(v) for v in combos[best]), float(bottleneck[best]), float(acc[best])
