"""Training and evaluation of sliceable models on the CPU.

The paper's pruning-aware regimes are plain hyper-parameters here (batch size, weight decay,
epochs): small batches and strong weight decay make a model degrade more gracefully when its
channels are pruned without fine-tuning.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.checkpoint import Checkpoint
from pipeline.data import ArrayDataset, Preprocess, Splits
from pipeline.errors import ConfigError
from pipeline.models import ResNetConfig, SliceableResNet, build_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 12
    batch_size: int = 64
    lr: float = 0.05
    weight_decay: float = 5e-4
    momentum: float = 0.9
    augment: bool = True
    seed: int = 0
    threads: int = 0  # 0: torch's default
    calibration_images: int = 256  # stored with the checkpoint for BatchNorm re-estimation

    def __post_init__(self) -> None:
        if self.epochs <= 0 or self.batch_size <= 0 or self.lr <= 0 or self.weight_decay < 0:
            raise ConfigError("epochs, batch size and lr must be positive, weight decay >= 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def augment_batch(x: torch.Tensor, generator: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random shifts (pad + crop) and horizontal flips; x is [B, C, H, W]."""
    b, _, h, w = x.shape
    padded = nn.functional.pad(x, (pad, pad, pad, pad), mode="replicate")
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    flip = torch.rand(b, generator=generator) < 0.5
    out = torch.empty_like(x)
    for i in range(b):
        crop = padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
        out[i] = crop.flip(-1) if flip[i] else crop
    return out


@torch.no_grad()
def predict(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
            batch_size: int = 256) -> torch.Tensor:
    """Class predictions of ``forward`` (a model or a composed pipeline) on inputs ``x``."""
    outs = [forward(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)]
    return torch.cat(outs) if outs else torch.empty(0, dtype=torch.long)


def accuracy(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
             y: torch.Tensor, batch_size: int = 256) -> float:
    return float((predict(forward, x, batch_size) == y).float().mean())


def train_model(model_config: ResNetConfig, splits: Splits, config: TrainConfig, *,
                progress: bool = True) -> Checkpoint:
    """Train a model; returns a checkpoint carrying the configs, metrics and history."""
    from tqdm import tqdm

    torch.manual_seed(config.seed)
    if config.threads:
        torch.set_num_threads(config.threads)
    gen = torch.Generator().manual_seed(config.seed)
    preprocess = Preprocess.fit(splits.train, model_config.input_size)
    x_train, y_train = preprocess(splits.train.images), torch.from_numpy(splits.train.labels)
    x_val, y_val = preprocess(splits.val.images), torch.from_numpy(splits.val.labels)
    model: SliceableResNet = build_model(model_config)
    opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                          weight_decay=config.weight_decay, nesterov=True)
    steps_per_epoch = math.ceil(len(x_train) / config.batch_size)
    total = steps_per_epoch * config.epochs
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=total,
                                                pct_start=0.15)
    loss_fn = nn.CrossEntropyLoss()
    history: list[dict[str, float]] = []
    started = time.perf_counter()
    for epoch in range(config.epochs):
        model.train()
        perm = torch.randperm(len(x_train), generator=gen)
        correct, seen, loss_sum = 0, 0, 0.0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{config.epochs}",
                   disable=not progress, leave=False, unit="step")
        for step in bar:
            idx = perm[step * config.batch_size:(step + 1) * config.batch_size]
            xb, yb = x_train[idx], y_train[idx]
            if config.augment:
                xb = augment_batch(xb, gen)
            logits = model(xb)
            loss = loss_fn(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += float(loss) * len(idx)
            correct += int((logits.argmax(1) == yb).sum())
            seen += len(idx)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
        model.eval()
        val_acc = accuracy(model, x_val, y_val)
        row = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_acc": correct / seen,
               "val_acc": val_acc, "elapsed_s": time.perf_counter() - started}
        history.append(row)
        log.info("epoch %d/%d: train loss %.3f, train acc %.4f, val acc %.4f (%.0f s)",
                 epoch + 1, config.epochs, row["train_loss"], row["train_acc"], val_acc,
                 row["elapsed_s"])
    rng = np.random.default_rng(config.seed)
    cal_idx = rng.choice(len(splits.train), size=min(config.calibration_images,
                                                     len(splits.train)), replace=False)
    return Checkpoint(
        config=model_config,
        preprocess=preprocess,
        state_dict={k: v.detach().clone() for k, v in model.state_dict().items()},
        train={"config": config.to_dict(), "history": history, "dataset": splits.train.name,
               "train_size": len(splits.train), "seconds": time.perf_counter() - started,
               "threads": torch.get_num_threads()},
        metrics={"val_acc": history[-1]["val_acc"]},
        calibration_images=splits.train.images[np.sort(cal_idx)],
    )


def evaluate_checkpoint(ckpt: Checkpoint, ds: ArrayDataset) -> float:
    model = ckpt.build()
    return accuracy(model, ckpt.preprocess(ds.images), torch.from_numpy(ds.labels))
