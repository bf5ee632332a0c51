"""Profiling a model block by block on this machine.

A profile measures, for every block of a :class:`~pipeline.models.SliceableResNet` (stem,
residual blocks, head), what :func:`pipeline.partition.partition` needs:

- ``compute_s``: the median forward time at batch 1 on ONE thread, after warm-up, over many
  runs. Runs are interleaved across blocks in rounds, so a change in background load shifts
  every block alike instead of biasing one of them;
- ``param_bytes``: the bytes of the block's parameters (BatchNorm running statistics, a few
  floats per channel, are not counted);
- ``activation_bytes``: an estimate of the peak activation memory at batch 1: the block's
  input plus twice its largest tensor (output or intermediate: an operation reads one such
  tensor while it writes the next, and a residual block keeps its input alive for the
  shortcut);
- ``output_bytes``: the float32 tensor the block emits at batch 1 (what crosses the wire when
  the model is cut after it).

A profile file is JSON (``kind: "profile"``) with the model's name and hash, the machine, the
measurement settings and the time it was made. :func:`load_profile` reads it back.

A device file (:mod:`pipeline.devices`) may name a profile made on the device itself
(``profile = "file.json"``): that device's times then come from its own profile instead of
from speed scaling.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.calibration.timing import Clock, peak_bytes, time_calls, torch_threads
from pipeline.errors import ConfigError
from pipeline.jsonfile import read_json
from pipeline.models import SliceableResNet
from pipeline.partition import BlockProfile

PROFILE_KIND = "profile"
PROFILE_VERSION = 1
FLOAT_BYTES = 4


def machine_info(threads: int | None = None) -> dict[str, Any]:
    """What the numbers were measured on: platform, processor, library versions, threads."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": _processor_name(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "cpu_capability": str(torch.backends.cpu.get_cpu_capability()),
        "threads": torch.get_num_threads() if threads is None else threads,
    }
    try:
        import torch_pruning

        info["torch_pruning"] = str(torch_pruning.__version__)
    except ImportError:  # pragma: no cover - a declared dependency
        pass
    return info


def _processor_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class BlockDetail:
    """What a profile records about a block beyond :class:`BlockProfile`."""

    name: str
    params: int
    macs: int
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    p10_s: float
    p90_s: float
    cpu_s: float  # median thread CPU time (see CallTimes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "params": self.params,
            "macs": self.macs,
            "in_shape": list(self.in_shape),
            "out_shape": list(self.out_shape),
            "p10_s": self.p10_s,
            "p90_s": self.p90_s,
            "cpu_s": self.cpu_s,
        }


@dataclass(frozen=True)
class ModelProfile:
    """Every block of one model measured on one machine (see the module docstring)."""

    blocks: tuple[BlockProfile, ...]
    model_name: str
    model_hash: str | None = None
    details: tuple[BlockDetail, ...] = ()
    machine: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)  # runs, warmup, threads, batch
    created: str = ""
    source: str | None = None  # the checkpoint it was made from

    def __post_init__(self) -> None:
        if not self.blocks:
            raise ConfigError("a profile needs at least one block")
        if self.details and [d.name for d in self.details] != self.block_names:
            raise ConfigError("profile details do not match its blocks")

    @property
    def block_names(self) -> list[str]:
        return [b.name for b in self.blocks]

    @property
    def block_times(self) -> tuple[float, ...]:
        return tuple(b.compute_s for b in self.blocks)

    @property
    def total_s(self) -> float:
        return math.fsum(self.block_times)

    def to_dict(self) -> dict[str, Any]:
        detail = {d.name: d.to_dict() for d in self.details}
        return {
            "kind": PROFILE_KIND,
            "version": PROFILE_VERSION,
            "model": {"name": self.model_name, "hash": self.model_hash, "source": self.source},
            "machine": self.machine,
            "settings": self.settings,
            "created": self.created,
            "blocks": [
                {
                    "name": b.name,
                    "compute_s": b.compute_s,
                    "param_bytes": b.param_bytes,
                    "activation_bytes": b.activation_bytes,
                    "output_bytes": b.output_bytes,
                    **detail.get(b.name, {}),
                }
                for b in self.blocks
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelProfile:
        if not isinstance(data, Mapping) or data.get("kind") != PROFILE_KIND:
            raise ConfigError("not a profile (expected kind 'profile')")
        if data.get("version") != PROFILE_VERSION:
            raise ConfigError(
                f"profile version {data.get('version')!r}, this edgeprune reads {PROFILE_VERSION}"
            )
        try:
            rows = data["blocks"]
            blocks = tuple(
                BlockProfile(
                    str(r["name"]),
                    r["compute_s"],
                    r["param_bytes"],
                    r["activation_bytes"],
                    r["output_bytes"],
                )
                for r in rows
            )
            details: tuple[BlockDetail, ...] = ()
            if all("macs" in r and "cpu_s" in r for r in rows):
                details = tuple(
                    BlockDetail(
                        str(r["name"]),
                        int(r["params"]),
                        int(r["macs"]),
                        tuple(r["in_shape"]),
                        tuple(r["out_shape"]),
                        float(r["p10_s"]),
                        float(r["p90_s"]),
                        float(r["cpu_s"]),
                    )
                    for r in rows
                )
            model = data["model"]
            return cls(
                blocks=blocks,
                model_name=str(model["name"]),
                model_hash=model.get("hash"),
                details=details,
                machine=dict(data.get("machine", {})),
                settings=dict(data.get("settings", {})),
                created=str(data.get("created", "")),
                source=model.get("source"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"malformed profile: {exc!r}") from exc

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path


def load_profile(path: str | Path) -> ModelProfile:
    """A profile written by :meth:`ModelProfile.save` (``edgeprune profile --out``)."""
    return ModelProfile.from_dict(read_json(path, "profile"))


def _tensor_bytes(shape: Sequence[int]) -> int:
    return int(np.prod(shape)) * FLOAT_BYTES


def _shapes_and_peaks(model: SliceableResNet) -> list[tuple[tuple[int, ...], tuple[int, ...], int]]:
    """Per block: input shape, output shape (batch 1) and its largest intermediate (bytes)."""
    x = torch.zeros(model.input_shape(1))
    rows = []
    for block in model.blocks:
        peak, y = peak_bytes(block, x)
        rows.append((tuple(x.shape), tuple(y.shape), peak))
        x = y
    return rows


def profile_model(
    model: SliceableResNet,
    *,
    model_hash: str | None = None,
    source: str | None = None,
    runs: int = 200,
    warmup: int = 20,
    rounds: int = 5,
    threads: int = 1,
    clock: Clock = "wall",
    progress: bool = False,
) -> ModelProfile:
    """Measure every block of ``model`` on this machine (batch 1, ``threads`` threads).

    ``compute_s`` is the median on ``clock`` (see :class:`CallTimes`; ``"cpu"`` only makes
    sense with one thread). The other clock's median and the spread go in ``details``.
    """
    if clock == "cpu" and threads != 1:
        raise ConfigError("clock 'cpu' measures the calling thread: use threads=1")
    from tqdm import tqdm

    from pipeline.pruning import count_macs

    model = model.eval()
    names = model.block_names()
    shapes = _shapes_and_peaks(model)
    inputs = [
        torch.randn(in_shape, generator=torch.Generator().manual_seed(k))
        for k, (in_shape, _, _) in enumerate(shapes)
    ]
    fns = [(lambda b=block, x=x: b(x)) for block, x in zip(model.blocks, inputs, strict=True)]
    with (
        tqdm(
            total=rounds * len(fns), desc="profile", unit="chunk", disable=not progress, leave=False
        ) as bar,
        torch_threads(threads),
    ):
        times = time_calls(
            fns, runs=runs, warmup=warmup, rounds=rounds, on_round=lambda: bar.update(1)
        )
    blocks, details = [], []
    for k, (block, name) in enumerate(zip(model.blocks, names, strict=True)):
        in_shape, out_shape, peak = shapes[k]
        params = sum(p.numel() for p in block.parameters())
        param_bytes = sum(p.numel() * p.element_size() for p in block.parameters())
        in_b, out_b = _tensor_bytes(in_shape), _tensor_bytes(out_shape)
        blocks.append(
            BlockProfile(
                name, times[k].median(clock), int(param_bytes), in_b + 2 * max(peak, out_b), out_b
            )
        )
        macs, _ = count_macs(block, in_shape[1:])
        details.append(
            BlockDetail(
                name,
                int(params),
                macs,
                in_shape[1:],
                out_shape[1:],
                times[k].percentile(10, clock),
                times[k].percentile(90, clock),
                times[k].median("cpu"),
            )
        )
    return ModelProfile(
        blocks=tuple(blocks),
        model_name=model.config.name,
        model_hash=model_hash,
        details=tuple(details),
        machine=machine_info(threads),
        settings={
            "runs": runs,
            "warmup": warmup,
            "rounds": rounds,
            "threads": threads,
            "batch": 1,
            "statistic": "median",
            "clock": clock,
            "busy_ratio": max(t.busy_ratio for t in times),
        },
        created=now_iso(),
        source=source,
    )


def profile_blocks(model: SliceableResNet, **kwargs: Any) -> list[BlockProfile]:
    """The blocks of :func:`profile_model` (same keyword arguments)."""
    return list(profile_model(model, **kwargs).blocks)
