"""Sliceable ResNet-style CNNs, written here (no torchvision).

A model is an ordered list of blocks; the boundaries between blocks are the legal cut points.
Block 0 is the stem, then the residual blocks stage by stage, and the last block is the head
(global average pool + linear classifier). Every block maps one tensor to one tensor:

    image [B, C_in, H, W] -> stem -> [B, w0, H/s, W/s] -> blocks ... -> head -> logits [B, K]

The file is pure: definitions and forward passes. Slicing and pruning are transformations of a
built model and live in ``pipeline.slicing`` and ``pipeline.pruning``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from pipeline.errors import ConfigError


@dataclass(frozen=True)
class ResNetConfig:
    """What builds a model; stored in every checkpoint so loading needs nothing else.

    widths: channels of each stage; depths: residual blocks per stage. The first stage keeps
    the stem's resolution, every later stage halves it.
    """

    name: str = "resnet-s"
    widths: tuple[int, ...] = (80, 160, 320)
    depths: tuple[int, ...] = (1, 1, 1)
    in_channels: int = 1
    input_size: int = 28
    num_classes: int = 10
    stem_stride: int = 2
    class_names: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if len(self.widths) != len(self.depths) or not self.widths:
            raise ConfigError("widths and depths must be non-empty and of the same length")
        if any(w <= 0 for w in self.widths) or any(d <= 0 for d in self.depths):
            raise ConfigError("widths and depths must be positive")
        if self.in_channels <= 0 or self.num_classes <= 1 or self.input_size < 8:
            raise ConfigError("in_channels > 0, num_classes > 1 and input_size >= 8 are required")
        if self.stem_stride not in (1, 2):
            raise ConfigError("stem_stride must be 1 or 2")
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ConfigError("class_names must have num_classes entries")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ResNetConfig:
        try:
            fields = dict(data)
            for key in ("widths", "depths", "class_names"):
                if key in fields:
                    fields[key] = tuple(fields[key])
            return cls(**fields)
        except TypeError as exc:
            raise ConfigError(f"bad model config: {exc}") from exc


# Presets. "resnet-s" is the small default: with widths a multiple of 80, every 10% level
# removes exactly 8 channels, so the six default levels are six distinct networks.
PRESETS: dict[str, ResNetConfig] = {
    "resnet-s": ResNetConfig(),
    "resnet-xs": ResNetConfig(name="resnet-xs", widths=(16, 32, 64), depths=(1, 1, 1)),
    # The CIFAR-style ResNet-18 layout: 4 stages of 2 basic blocks, widths 64..512, 3x3 stem.
    "resnet18-cifar": ResNetConfig(
        name="resnet18-cifar",
        widths=(64, 128, 256, 512),
        depths=(2, 2, 2, 2),
        in_channels=3,
        input_size=32,
        stem_stride=1,
    ),
}


def preset(name: str, **overrides: Any) -> ResNetConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown model {name!r}; choose one of {sorted(PRESETS)}")
    data = PRESETS[name].to_dict()
    data.update({k: v for k, v in overrides.items() if v is not None})
    return ResNetConfig.from_dict(data)


class Stem(nn.Module):
    """3x3 conv + BN + ReLU: [B, C_in, H, W] -> [B, w0, H/s, W/s]."""

    def __init__(self, in_channels: int, width: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, 3, stride=stride, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


class BasicBlock(nn.Module):
    """The ResNet basic block: two 3x3 convs and a shortcut (1x1 conv when the shape changes).

    [B, c_in, H, W] -> [B, c_out, H/stride, W/stride]
    """

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class Head(nn.Module):
    """Global average pool + linear classifier: [B, C, h, w] -> logits [B, K]."""

    def __init__(self, width: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class SliceableResNet(nn.Module):
    """A ResNet whose ``blocks`` (stem, residual blocks, head) may be cut between any two."""

    def __init__(self, config: ResNetConfig) -> None:
        super().__init__()
        self.config = config
        blocks: list[nn.Module] = [Stem(config.in_channels, config.widths[0], config.stem_stride)]
        c_in = config.widths[0]
        for stage, (width, depth) in enumerate(zip(config.widths, config.depths, strict=True)):
            for i in range(depth):
                stride = 2 if (stage > 0 and i == 0) else 1
                blocks.append(BasicBlock(c_in, width, stride))
                c_in = width
        blocks.append(Head(c_in, config.num_classes))
        self.blocks = nn.ModuleList(blocks)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def block_names(self) -> list[str]:
        names = ["stem"]
        for stage, depth in enumerate(self.config.depths):
            names += [f"s{stage + 1}b{i + 1}" for i in range(depth)]
        return [*names, "head"]

    def input_shape(self, batch: int = 1) -> tuple[int, int, int, int]:
        c = self.config
        return (batch, c.in_channels, c.input_size, c.input_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def build_model(config: ResNetConfig) -> SliceableResNet:
    return SliceableResNet(config)
