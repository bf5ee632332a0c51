"""The calibration procedure: measure what the controller's two models are fitted to, fit them,
and return one :class:`~pipeline.calibration.file.Calibration` (DESIGN.md, "Control loop").

For a model cut into slices (by cut points or by a :class:`~pipeline.partition.Partition`):

1. **Latency.** Every slice at every level, the real :class:`~pipeline.pruning.PrunableSlice`
   variants (built once, with BatchNorm re-estimation) at batch 1 on ONE thread: the median of
   ``runs`` calls after ``warmup``, levels interleaved in rounds so that background load hits
   them alike. The input is a real image's full-width activation at the slice's boundary.
   With devices the times are then scaled to the device (emulation by speed scaling, or
   by the device's own profile; the file's ``meta`` says which). Fit ``t_i(p) = a_i p + b_i``.
2. **Accuracy.** End-to-end accuracy on held-out images over per-slice level vectors: the full
   grid when it has at most ``grid_limit`` points, else the grid's corners, the uniform
   diagonal and seeded random vectors up to ``samples``. One
   :class:`~pipeline.reference.ComposedPipeline` is built once and switched with
   ``set_levels``; vectors are visited in lexicographic order and a slice's output is reused
   while the levels before and at it are unchanged (a prefix cache), which gives the same
   numbers as running the whole pipeline per vector, faster
   (:func:`~pipeline.calibration.accuracy.accuracy_at_levels`). Fit the scaled logistic
   ``a(p)`` with ``lo = 1 / num_classes``.

:func:`calibrate` is the entry point (``edgeprune calibrate`` and the experiment harness).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.calibration.accuracy import (
    LevelVector,
    accuracy_at_levels,
    accuracy_fit_check,
    fit_logistic_accuracy,
)
from pipeline.calibration.file import Calibration, SliceLatency
from pipeline.calibration.latency import fit_linear
from pipeline.calibration.timing import CLOCKS, CallTimes, Clock, time_calls, torch_threads
from pipeline.checkpoint import Checkpoint
from pipeline.data import ArrayDataset, load_dataset, split_dataset
from pipeline.devices import Device
from pipeline.errors import ConfigError
from pipeline.jsonfile import read_json
from pipeline.models import SliceableResNet
from pipeline.partition import Partition
from pipeline.placement import Placement, SliceBounds
from pipeline.profiling import machine_info, now_iso
from pipeline.pruning import DEFAULT_RATIOS, PrunableSlice, validate_ratios
from pipeline.reference import ComposedPipeline

log = logging.getLogger(__name__)

BUSY_WARNING = 1.25  # wall / CPU median (of any slice and level) that flags a busy machine


@dataclass(frozen=True)
class CalibrationSettings:
    """How much to measure. The defaults keep a 2-3 slice run of resnet-s under a minute on
    two cores."""

    ratios: tuple[float, ...] = DEFAULT_RATIOS
    round_to: int = 8
    runs: int = 200  # timed calls per slice and level
    warmup: int = 20
    rounds: int = 5
    grid_limit: int = 64  # the full grid is measured when it has at most this many points
    samples: int = 64  # otherwise: corners + diagonal + random vectors, this many in all
    seed: int = 0
    batch_size: int = 500
    recalibrate_bn: bool = True
    clock: Clock = "wall"  # latency statistic: wall time, or the thread's CPU time

    def __post_init__(self) -> None:
        object.__setattr__(self, "ratios", validate_ratios(self.ratios))
        if self.clock not in CLOCKS:
            raise ConfigError(f"clock must be one of {CLOCKS}, got {self.clock!r}")
        if len(self.ratios) < 2:
            raise ConfigError("calibration needs at least two levels")
        if min(self.runs, self.rounds, self.batch_size, self.round_to) < 1 or self.warmup < 0:
            raise ConfigError("runs, rounds, batch_size and round_to must be >= 1, warmup >= 0")
        if self.grid_limit < 1 or self.samples < 1:
            raise ConfigError("grid_limit and samples must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ratios"] = list(self.ratios)
        return out


def default_nodes(n: int) -> list[str]:
    """Node names used when neither a plan nor devices name the stages: n0, n1, ..."""
    return [f"n{k}" for k in range(n)]


def _names(n: int, devices: Sequence[str | Device] | None) -> list[str]:
    if devices is None:
        return default_nodes(n)
    names = [d if isinstance(d, str) else d.name for d in devices]
    if len(names) != n:
        raise ConfigError(f"{n} slices but {len(names)} devices/nodes {names}")
    return names


def plan_hash_of(
    bounds: Sequence[SliceBounds], devices: Sequence[str | Device] | None = None
) -> str:
    """The hash of a placement: slice bounds and the device (node) of each slice, in order.

    Equals :meth:`Placement.placement_hash` of the same placement, so a controller holding the
    retained plan computes ``plan_hash_of(message.bounds, message.nodes)`` to check that a
    calibration file belongs to it. ``devices=None`` means nodes ``n0, n1, ...``.
    """
    names = _names(len(bounds), devices)
    return Placement.build(bounds, names).placement_hash()


def load_plan(path: str | Path) -> Partition:
    """A plan JSON written by ``edgeprune partition`` (extra keys are ignored)."""
    return Partition.from_dict(read_json(path, "plan"))


def load_split(
    name: str, data_dir: str | Path, split: str, limit: int | None = None, seed: int = 0
) -> ArrayDataset:
    """The ``split`` part of the standard split of dataset ``name``, optionally a seeded
    random subset of ``limit`` images."""
    if split not in ("train", "val", "test"):
        raise ConfigError(f"split must be train, val or test, got {split!r}")
    part = getattr(split_dataset(load_dataset(name, Path(data_dir))), split)
    if limit is not None and limit < len(part):
        idx = np.sort(np.random.default_rng(seed).choice(len(part), size=limit, replace=False))
        part = part.subset(idx, f"{part.name}[{limit}]")
    return part


def level_vectors(
    n_slices: int, n_levels: int, *, grid_limit: int = 64, samples: int = 64, seed: int = 0
) -> tuple[list[LevelVector], bool]:
    """The per-slice level vectors to measure accuracy at, sorted, and whether it is the full
    grid. Sampled sets always hold every corner of the grid and the uniform diagonal."""
    if n_slices < 1 or n_levels < 2:
        raise ConfigError("need at least one slice and two levels")
    size = n_levels**n_slices
    if size <= grid_limit:
        return list(itertools.product(range(n_levels), repeat=n_slices)), True
    top = n_levels - 1
    chosen: set[LevelVector] = set(itertools.product((0, top), repeat=n_slices))
    chosen.update((level,) * n_slices for level in range(n_levels))
    target = min(size, max(samples, len(chosen)))
    rng = np.random.default_rng(seed)
    while len(chosen) < target:
        chosen.add(tuple(int(v) for v in rng.integers(0, n_levels, size=n_slices)))
    return sorted(chosen), False


def block_inputs(model: SliceableResNet, x: torch.Tensor, batch: int = 500) -> list[torch.Tensor]:
    """The full-width input of every block of the unpruned ``model`` (and the logits last) for
    inputs ``x``, computed in batches of ``batch``."""
    act = [x]
    with torch.no_grad():
        for block in model.blocks:
            h = act[-1]
            act.append(torch.cat([block(h[k : k + batch]) for k in range(0, len(h), batch)]))
    return act


def measure_latency(
    slices: Sequence[PrunableSlice],
    inputs: Sequence[torch.Tensor],
    *,
    runs: int,
    warmup: int,
    rounds: int = 5,
    on_slice: Callable[[], None] | None = None,
) -> list[list[CallTimes]]:
    """Per slice, per level: ``runs`` call times of the level's module on ONE thread at
    batch 1, levels interleaved in ``rounds`` (:func:`~pipeline.calibration.timing.time_calls`).
    ``inputs[k]`` is slice k's full-width input (its first row is used)."""
    out = []
    with torch_threads(1):
        for s, x in zip(slices, inputs, strict=True):
            fns = [(lambda m=v.module, x1=x[:1]: m(x1)) for v in s.variants]
            out.append(time_calls(fns, runs=runs, warmup=warmup, rounds=rounds))
            if on_slice is not None:
                on_slice()
    return out


def _stage_specs(
    n: int, names: Sequence[str], devices: Sequence[Device] | None, by_name: bool
) -> list[Device | None]:
    if devices is None:
        return [None] * n
    specs = list(devices)
    if not by_name:
        if len(specs) != n:
            raise ConfigError(
                f"{n} slices but {len(specs)} devices; give one device per slice "
                "or a plan (edgeprune partition)"
            )
        return list(specs)
    table = {s.name: s for s in specs}
    missing = [name for name in names if name not in table]
    if missing:
        raise ConfigError(f"the plan places stages on {missing}, which the device file lacks")
    return [table[name] for name in names]


def _placement(
    bounds: Sequence[SliceBounds] | None,
    plan: Partition | None,
    devices: Sequence[Device] | None,
    nodes: Sequence[str] | None,
) -> tuple[list[SliceBounds], list[str], str, list[Device | None]]:
    """The slices, their names, the plan hash and each slice's device (None: this
    machine), from cut points or a partition (see :func:`calibrate`)."""
    if plan is not None and bounds is None:
        bounds = list(plan.placement.bounds)
        names = list(plan.placement.nodes)
        plan_hash = plan.placement.placement_hash()
    elif bounds is not None and plan is None:
        bounds = list(bounds)
        names = _names(len(bounds), nodes if nodes is not None else devices)
        plan_hash = plan_hash_of(bounds, names)
    else:
        raise ConfigError("give exactly one of bounds (cut points) or a plan")
    specs = _stage_specs(len(bounds), names, devices, by_name=plan is not None)
    if plan is not None and devices is None:
        log.warning(
            "the plan places stages on %s but no devices were given: latencies are "
            "this machine's, not emulated",
            ", ".join(names),
        )
    return bounds, names, plan_hash, specs


def _fit_latency(
    times: list[list[CallTimes]],
    bounds: Sequence[SliceBounds],
    names: Sequence[str],
    specs: Sequence[Device | None],
    settings: CalibrationSettings,
) -> tuple[list[SliceLatency], list[dict[str, Any]], list[list[float]], float]:
    """Per slice, the measured medians scaled to its device and the linear fit; the
    device notes for ``meta``, the medians and how busy the machine was."""
    slices: list[SliceLatency] = []
    device_meta: list[dict[str, Any]] = []
    clock = settings.clock
    measured = [[t.median(clock) for t in per_slice] for per_slice in times]
    busy = max(t.busy_ratio for per_slice in times for t in per_slice)
    if busy > BUSY_WARNING:
        log.warning(
            "this machine is busy: wall-clock latency is %.1fx the CPU time of the "
            "same calls; the %s-clock fits are %s",
            busy,
            clock,
            "inflated (rerun on a quiet machine, or use clock 'cpu')"
            if clock == "wall"
            else "unaffected",
        )
    for i, (b, name, spec) in enumerate(zip(bounds, names, specs, strict=True)):
        factor = 1.0 if spec is None else spec.time_factor(b.start, b.end, measured[i][0])
        points = tuple((r, m * factor) for r, m in zip(settings.ratios, measured[i], strict=True))
        fit = fit_linear([p[0] for p in points], [p[1] for p in points])
        slices.append(SliceLatency(i, b.start, b.end, name, points, fit))
        device_meta.append(
            {
                "stage": i,
                "device": name,
                "time_factor": factor,
                "source": "this machine" if spec is None else spec.describe(),
            }
        )
    return slices, device_meta, measured, busy


def _latency_meta(
    times: list[list[CallTimes]], clock: Clock, measured: list[list[float]], busy: float
) -> dict[str, Any]:
    """How the latencies were measured, and their spread, for the file's ``meta``."""
    return {
        "threads": 1,
        "batch": 1,
        "statistic": "median",
        "clock": clock,
        "input": "one held-out image's full-width activation at the slice input",
        "measured_s": measured,
        "p10_s": [[t.percentile(10, clock) for t in s] for s in times],
        "p90_s": [[t.percentile(90, clock) for t in s] for s in times],
        "wall_s": [[t.median("wall") for t in s] for s in times],
        "cpu_s": [[t.median("cpu") for t in s] for s in times],
        "busy_ratio": busy,
    }


def calibrate(
    ckpt: Checkpoint,
    data: ArrayDataset,
    *,
    bounds: Sequence[SliceBounds] | None = None,
    plan: Partition | None = None,
    devices: Sequence[Device] | None = None,
    nodes: Sequence[str] | None = None,
    settings: CalibrationSettings | None = None,
    split: str = "val",
    progress: bool = True,
) -> Calibration:
    """Measure and fit one calibration (see the module docstring).

    Give the slices either as ``bounds`` or as a partition ``plan`` (its stages' devices then
    name the slices, and ``devices`` are matched by name). Without a plan, ``devices`` (one per
    slice, in order) or ``nodes`` name the slices; default ``n0, n1, ...``. ``devices`` turn on
    emulation: latencies measured here are scaled to each device. ``data`` is the held-out set
    (``split`` is recorded in ``meta``).

    Steps: the placement (:func:`_placement`), the level vectors (:func:`level_vectors`), one
    composed pipeline, the latencies (:func:`measure_latency`) and accuracies
    (:func:`~pipeline.calibration.accuracy.accuracy_at_levels`) measured on it, then the fits
    (:func:`_fit_latency`, :func:`~pipeline.calibration.accuracy.fit_logistic_accuracy`).
    """
    from tqdm import tqdm

    started = time.perf_counter()
    settings = settings or CalibrationSettings()
    bounds, names, plan_hash, specs = _placement(bounds, plan, devices, nodes)
    if len(data) == 0:
        raise ConfigError("no held-out images to measure accuracy on")
    x, y = ckpt.preprocess(data.images), torch.from_numpy(data.labels)
    n, n_levels = len(bounds), len(settings.ratios)
    vectors, full_grid = level_vectors(
        n, n_levels, grid_limit=settings.grid_limit, samples=settings.samples, seed=settings.seed
    )

    t0 = time.perf_counter()
    recal = settings.recalibrate_bn and ckpt.calibration_images is not None
    pipe = ComposedPipeline(
        ckpt, bounds, ratios=settings.ratios, round_to=settings.round_to, recalibrate_bn=recal
    )
    build_s = time.perf_counter() - t0
    log.info("built %d slices x %d levels in %.1f s", n, n_levels, build_s)

    with tqdm(
        total=n + len(vectors), desc="calibrate", unit="step", disable=not progress, leave=False
    ) as bar:
        bar.set_postfix_str("latency")
        t0 = time.perf_counter()
        model_inputs = block_inputs(ckpt.build(), x[:1])
        times = measure_latency(
            pipe.slices,
            [model_inputs[b.start] for b in bounds],
            runs=settings.runs,
            warmup=settings.warmup,
            rounds=settings.rounds,
            on_slice=lambda: bar.update(1),
        )
        latency_s = time.perf_counter() - t0
        bar.set_postfix_str(f"accuracy ({len(vectors)} vectors, {len(data)} images)")
        t0 = time.perf_counter()
        accs = accuracy_at_levels(
            pipe.slices,
            vectors,
            x,
            y,
            batch_size=settings.batch_size,
            on_point=lambda: bar.update(1),
        )
        accuracy_s = time.perf_counter() - t0
    pipe.set_levels([0] * n)

    clock = settings.clock
    slices, device_meta, measured, busy = _fit_latency(times, bounds, names, specs, settings)

    ratio_points = [tuple(settings.ratios[level] for level in v) for v in vectors]
    acc_fit = fit_logistic_accuracy(
        np.asarray(ratio_points),
        np.asarray(accs),
        form="scaled",
        num_classes=ckpt.config.num_classes,
    )
    emulated = devices is not None
    meta: dict[str, Any] = {
        "created": now_iso(),
        "machine": machine_info(),
        "checkpoint": str(ckpt.path) if ckpt.path else None,
        "model": ckpt.config.name,
        "split": split,
        "dataset": data.name,
        "samples": len(data),
        "points": len(vectors),
        "selection": "full grid"
        if full_grid
        else "corners + uniform diagonal + seeded random vectors",
        "levels": [list(v) for v in vectors],
        "settings": settings.to_dict(),
        "latency": _latency_meta(times, clock, measured, busy),
        "accuracy_threads": torch.get_num_threads(),
        "accuracy_fit_form": "scaled",
        "recalibrate_bn": recal,
        "emulated": emulated,
        "emulation": (
            "emulated by speed scaling: latency measured on this machine x each "
            "device's time factor (1 / speed, or the ratio of its own profile's "
            "block times)"
        )
        if emulated
        else "measured on this machine, not emulated",
        "devices": device_meta,
        "accuracy_fit_check": accuracy_fit_check(ratio_points, accs, acc_fit),
        "seconds": {
            "build": build_s,
            "latency": latency_s,
            "accuracy": accuracy_s,
            "total": time.perf_counter() - started,
        },
    }
    log.info(
        "calibrated in %.1f s: latency R^2 %s, accuracy max abs error %.4f over %d vectors",
        meta["seconds"]["total"],
        ", ".join(f"{s.fit.r2:.3f}" for s in slices),
        acc_fit.max_abs_error,
        len(vectors),
    )
    return Calibration(
        ratios=settings.ratios,
        slices=tuple(slices),
        accuracy_points=tuple(zip(ratio_points, accs, strict=True)),
        accuracy_fit=acc_fit,
        model_hash=ckpt.model_hash(),
        plan_hash=plan_hash,
        num_classes=ckpt.config.num_classes,
        meta=meta,
    )
