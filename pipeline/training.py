"""Training and evaluation of sliceable models on the CPU.

Three regimes (:data:`REGIMES`). The paper's pruning-aware regime is plain hyper-parameters
(small batches, strong weight decay, more epochs). Width-robust training
(``width_robust=True``, :mod:`pipeline.robust`) also trains, at every step, the sub-networks
the nodes run: pruned the way the nodes prune (L1-ranked channels per coupled group, the
system's levels, per-slice levels on random cuts), by the sandwich rule with in-place
distillation from the full width.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.calibration.accuracy import accuracy_at_levels
from pipeline.checkpoint import Checkpoint
from pipeline.data import Preprocess, Splits
from pipeline.errors import ConfigError
from pipeline.models import ResNetConfig, SliceableResNet, build_model
from pipeline.placement import SliceBounds
from pipeline.pruning import DEFAULT_RATIOS, PrunableSlice, validate_ratios
from pipeline.robust import SubnetSampler, WidthMasker, sandwich_step
from pipeline.slicing import ModelSlice

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """How a model is trained; stored in its checkpoint.

    Width-robust fields (used when ``width_robust``): ``subnet_ratios`` are the system's
    levels (the largest is the smallest width trained at every step); ``random_subnets``
    random sub-networks per step, a fraction ``mixed_prob`` of them on random cuts into at
    most ``max_slices`` slices with a level each; sub-network loss = ``distill_weight`` x
    distillation + (1 - ``distill_weight``) x labels; channel masks re-ranked from the current
    weights every ``mask_refresh`` steps; kept channels rounded to ``round_to``.
    """

    epochs: int = 12
    batch_size: int = 64
    lr: float = 0.05
    weight_decay: float = 5e-4
    momentum: float = 0.9
    augment: bool = True
    seed: int = 0
    threads: int = 0  # 0: torch's default
    calibration_images: int = 256  # stored with the checkpoint for BatchNorm re-estimation
    regime: str = "custom"
    width_robust: bool = False
    subnet_ratios: tuple[float, ...] = DEFAULT_RATIOS
    random_subnets: int = 2
    mixed_prob: float = 0.5
    max_slices: int = 3
    distill_weight: float = 1.0
    mask_refresh: int = 4
    round_to: int = 8

    def __post_init__(self) -> None:
        if self.epochs <= 0 or self.batch_size <= 0 or self.lr <= 0 or self.weight_decay < 0:
            raise ConfigError("epochs, batch size and lr must be positive, weight decay >= 0")
        object.__setattr__(self, "subnet_ratios", validate_ratios(self.subnet_ratios))
        if self.width_robust and len(self.subnet_ratios) < 2:
            raise ConfigError("width-robust training needs at least one pruned level")
        if self.random_subnets < 0 or not 0.0 <= self.mixed_prob <= 1.0 or self.max_slices < 1:
            raise ConfigError("random_subnets >= 0, mixed_prob in [0, 1], max_slices >= 1")
        if not 0.0 <= self.distill_weight <= 1.0:
            raise ConfigError("distill_weight must be in [0, 1]")
        if self.mask_refresh < 1 or self.round_to < 1:
            raise ConfigError("mask_refresh and round_to must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["subnet_ratios"] = list(self.subnet_ratios)
        return data


# The regimes compared in bench/robust_grid.py (docs/bench/robust.md). DEFAULT_REGIME is what a
# plain `edgeprune train` uses and what models/resnet-s.pt was trained with.
REGIMES: dict[str, TrainConfig] = {
    "standard": TrainConfig(regime="standard", epochs=15, batch_size=64, weight_decay=5e-4),
    "paper-robust": TrainConfig(regime="paper-robust", epochs=20, batch_size=16, weight_decay=5e-3),
    "width-robust": TrainConfig(
        regime="width-robust", epochs=15, batch_size=64, weight_decay=5e-4, width_robust=True
    ),
}
DEFAULT_REGIME = "paper-robust"


def regime(name: str, **overrides: Any) -> TrainConfig:
    """The preset ``name`` with ``overrides`` (None values are ignored)."""
    if name not in REGIMES:
        raise ConfigError(f"unknown regime {name!r}; choose one of {sorted(REGIMES)}")
    return replace(REGIMES[name], **{k: v for k, v in overrides.items() if v is not None})


def augment_batch(x: torch.Tensor, generator: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random shifts (pad + crop) and horizontal flips; x is [B, C, H, W]."""
    b, _, h, w = x.shape
    padded = nn.functional.pad(x, (pad, pad, pad, pad), mode="replicate")
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    flip = torch.rand(b, generator=generator) < 0.5
    out = torch.empty_like(x)
    for i in range(b):
        crop = padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
        out[i] = crop.flip(-1) if flip[i] else crop
    return out


@torch.no_grad()
def predict(
    forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_size: int = 256
) -> torch.Tensor:
    """Class predictions of ``forward`` (a model or a composed pipeline) on inputs ``x``."""
    outs = [forward(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)]
    return torch.cat(outs) if outs else torch.empty(0, dtype=torch.long)


def accuracy(
    forward: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int = 256,
) -> float:
    return float((predict(forward, x, batch_size) == y).float().mean())


def train_model(
    model_config: ResNetConfig, splits: Splits, config: TrainConfig, *, progress: bool = True
) -> Checkpoint:
    """Train a model; returns a checkpoint carrying the configs, metrics and history."""
    from tqdm import tqdm

    torch.manual_seed(config.seed)
    if config.threads:
        torch.set_num_threads(config.threads)
    gen = torch.Generator().manual_seed(config.seed)
    preprocess = Preprocess.fit(splits.train, model_config.input_size)
    x_train, y_train = preprocess(splits.train.images), torch.from_numpy(splits.train.labels)
    x_val, y_val = preprocess(splits.val.images), torch.from_numpy(splits.val.labels)
    rng = np.random.default_rng(config.seed)
    cal_idx = np.sort(
        rng.choice(
            len(splits.train), size=min(config.calibration_images, len(splits.train)), replace=False
        )
    )
    calibration = splits.train.images[cal_idx]
    model: SliceableResNet = build_model(model_config)
    opt = torch.optim.SGD(
        model.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        nesterov=True,
    )
    steps_per_epoch = math.ceil(len(x_train) / config.batch_size)
    total = steps_per_epoch * config.epochs
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=config.lr, total_steps=total, pct_start=0.15
    )
    loss_fn = nn.CrossEntropyLoss()
    masker = WidthMasker(model, round_to=config.round_to) if config.width_robust else None
    sampler = SubnetSampler(
        model.num_blocks,
        config.subnet_ratios,
        random_subnets=config.random_subnets,
        mixed_prob=config.mixed_prob,
        max_slices=config.max_slices,
        seed=config.seed,
    )
    history: list[dict[str, float]] = []
    started, cpu_started = time.perf_counter(), time.process_time()
    global_step = 0
    with masker if masker is not None else nullcontext():
        for epoch in range(config.epochs):
            model.train()
            perm = torch.randperm(len(x_train), generator=gen)
            correct, seen, loss_sum, sub_sum = 0, 0, 0.0, 0.0
            bar = tqdm(
                range(steps_per_epoch),
                desc=f"epoch {epoch + 1}/{config.epochs}",
                disable=not progress,
                leave=False,
                unit="step",
            )
            for step in bar:
                idx = perm[step * config.batch_size : (step + 1) * config.batch_size]
                xb, yb = x_train[idx], y_train[idx]
                if config.augment:
                    xb = augment_batch(xb, gen)
                opt.zero_grad(set_to_none=True)
                if masker is not None:
                    if global_step % config.mask_refresh == 0:
                        masker.refresh()
                    result = sandwich_step(
                        model,
                        masker,
                        sampler.sample(),
                        xb,
                        yb,
                        distill_weight=config.distill_weight,
                        label_loss=loss_fn,
                    )
                    logits, loss_value = result.full_logits, result.full_loss
                    sub_sum += result.subnet_loss * len(idx)
                else:
                    logits = model(xb)
                    loss = loss_fn(logits, yb)
                    loss.backward()
                    loss_value = float(loss.detach())
                opt.step()
                sched.step()
                global_step += 1
                loss_sum += loss_value * len(idx)
                correct += int((logits.argmax(1) == yb).sum())
                seen += len(idx)
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
            model.eval()
            val_acc = accuracy(model, x_val, y_val)
            row = {
                "epoch": epoch + 1,
                "train_loss": loss_sum / seen,
                "train_acc": correct / seen,
                "val_acc": val_acc,
            }
            if masker is not None:
                row["subnet_loss"] = sub_sum / seen
                smallest = config.subnet_ratios[-1]
                row[f"val_acc_ratio_{smallest:g}"] = pruned_accuracy(
                    model, smallest, preprocess(calibration), x_val, y_val, round_to=config.round_to
                )
            row["elapsed_s"] = time.perf_counter() - started
            history.append(row)
            log.info(
                "epoch %d/%d: %s",
                epoch + 1,
                config.epochs,
                ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "epoch"),
            )
    return Checkpoint(
        config=model_config,
        preprocess=preprocess,
        state_dict={k: v.detach().clone() for k, v in model.state_dict().items()},
        train={
            "config": config.to_dict(),
            "history": history,
            "dataset": splits.train.name,
            "train_size": len(splits.train),
            "seconds": time.perf_counter() - started,
            "cpu_seconds": time.process_time() - cpu_started,
            "threads": torch.get_num_threads(),
        },
        metrics={"val_acc": history[-1]["val_acc"]},
        calibration_images=calibration,
    )


def pruned_accuracy(
    model: SliceableResNet,
    ratio: float,
    calibration: torch.Tensor | None,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    round_to: int = 8,
) -> float:
    """Accuracy of ``model`` pruned as one slice at ``ratio`` the way a node prunes it.

    Built from a clean copy with :class:`~pipeline.pruning.PrunableSlice`; with
    ``calibration`` (preprocessed images), BatchNorm statistics are re-estimated on them.
    """
    clean = build_model(model.config)
    clean.load_state_dict(model.state_dict())
    clean.eval()
    pruned = PrunableSlice(
        ModelSlice(clean, SliceBounds(0, clean.num_blocks)),
        (0.0, ratio),
        round_to=round_to,
        calibration_inputs=calibration,
    )
    return accuracy_at_levels([pruned], [(1,)], x, y, batch_size=256)[0]
