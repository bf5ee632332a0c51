"""The SlimEdge measurements: what every block and every slice of a model costs at each pruning
level, and how much accuracy pruning it alone loses (its importance).

Measured once per model on this machine (:func:`measure`, cached as JSON by
:func:`load_or_measure`), with the real run-time variants (:class:`PrunableSlice`, BatchNorm
re-estimated, exactly what a node builds):

- **Per block, per level** (single-block slices ``[b, b+1)``): the median latency at batch 1
  on one thread, parameters, peak activation bytes (full-width input + 2 x the largest
  intermediate or output, as ``pipeline.profiling``), and the bytes the block sends when a cut
  follows it (kept channels + their int32 indices). The planner adds these up per slice.
- **Per contiguous range, per level** (every slice any partition can make): the measured
  latency (to check that per-block sums predict slices; see ``docs/slimedge.md``) and the
  accuracy when ONLY that range is pruned, as one slice (its *importance*:
  ``unpruned - accuracy``). Units of length one are the per-block importances.
- **Combos**: seeded random partitions with random per-slice levels (at least two pruned),
  measured end to end (:func:`sample_combos`).

The accuracy model fitted to these (:class:`~pipeline.calibration.accuracy.AccuracyModel`,
:func:`~pipeline.calibration.accuracy.fit_accuracy_model`) and the measured veto
(:class:`~pipeline.calibration.accuracy.MeasuredAccuracy`) are in
:mod:`pipeline.calibration.accuracy`; the timing and peak-memory helpers in
:mod:`pipeline.calibration.timing`.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from pipeline.calibration.accuracy import AccuracyModel, accuracy_at_levels
from pipeline.calibration.measure import block_inputs, measure_latency
from pipeline.calibration.timing import peak_bytes
from pipeline.checkpoint import Checkpoint
from pipeline.data import ArrayDataset
from pipeline.errors import ConfigError
from pipeline.jsonfile import read_json
from pipeline.partition import BlockProfile
from pipeline.placement import SliceBounds
from pipeline.pruning import DEFAULT_RATIOS, PrunableSlice, validate_ratios
from pipeline.reference import build_prunable

log = logging.getLogger(__name__)

KIND = "slimedge-measurements"
VERSION = 1
FLOAT_BYTES = 4
Range = tuple[int, int]
_COST_KEYS = ("time_s", "param_bytes", "activation_bytes", "output_bytes")


def contiguous_ranges(n: int) -> list[Range]:
    """Every block range ``[i, j)`` of an ``n``-block model, in lexicographic order."""
    return [(i, j) for i in range(n) for j in range(i + 1, n + 1)]


@dataclass(frozen=True)
class CostTable:
    """Per block, per level (``[n, L]``): reference time (s), parameter bytes, peak activation
    bytes and the bytes sent when a cut follows the block."""

    block_names: tuple[str, ...]
    ratios: tuple[float, ...]
    time_s: NDArray[np.float64]
    param_bytes: NDArray[np.float64]
    activation_bytes: NDArray[np.float64]
    output_bytes: NDArray[np.float64]

    def __post_init__(self) -> None:
        shape = (len(self.block_names), len(self.ratios))
        for name in ("time_s", "param_bytes", "activation_bytes", "output_bytes"):
            if np.shape(getattr(self, name)) != shape:
                raise ConfigError(f"cost table {name} must have shape {shape}")

    @property
    def n_blocks(self) -> int:
        return len(self.block_names)

    @property
    def n_levels(self) -> int:
        return len(self.ratios)

    def profile(self, level: int) -> list[BlockProfile]:
        """Every block at one level, for :func:`pipeline.partition.partition`."""
        return [
            BlockProfile(
                name,
                float(self.time_s[b, level]),
                int(self.param_bytes[b, level]),
                int(self.activation_bytes[b, level]),
                int(self.output_bytes[b, level]),
            )
            for b, name in enumerate(self.block_names)
        ]

    def footprint(self, level: int = 0) -> float:
        """Bytes to hold the whole model as one slice at ``level``."""
        return float(self.param_bytes[:, level].sum() + self.activation_bytes[:, level].max())


@dataclass(frozen=True)
class Combo:
    """One measured configuration: slice bounds, a level per slice, end-to-end accuracy."""

    bounds: tuple[Range, ...]
    levels: tuple[int, ...]
    accuracy: float


@dataclass(frozen=True)
class Measurements:
    """Everything :func:`measure` records (arrays are ``[blocks or ranges, levels]``)."""

    model_name: str
    model_hash: str
    num_classes: int
    costs: CostTable
    ranges: tuple[Range, ...]
    range_time_s: NDArray[np.float64]
    range_accuracy: NDArray[np.float64]
    combos: tuple[Combo, ...]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_blocks(self) -> int:
        return self.costs.n_blocks

    @property
    def unpruned_accuracy(self) -> float:
        return float(self.range_accuracy[0, 0])

    def range_index(self) -> dict[Range, int]:
        return {r: k for k, r in enumerate(self.ranges)}

    def block_importance(self) -> NDArray[np.float64]:
        """Accuracy lost when only block b is pruned at level l: ``[n, L]``."""
        idx = self.range_index()
        rows = [self.range_accuracy[idx[(b, b + 1)]] for b in range(self.n_blocks)]
        return self.unpruned_accuracy - np.asarray(rows)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": KIND,
            "version": VERSION,
            "model": self.model_name,
            "model_hash": self.model_hash,
            "num_classes": self.num_classes,
            "ratios": list(self.costs.ratios),
            "block_names": list(self.costs.block_names),
            "blocks": {k: getattr(self.costs, k).tolist() for k in _COST_KEYS},
            "ranges": [list(r) for r in self.ranges],
            "range_time_s": self.range_time_s.tolist(),
            "range_accuracy": self.range_accuracy.tolist(),
            "combos": [
                {
                    "bounds": [list(b) for b in c.bounds],
                    "levels": list(c.levels),
                    "accuracy": c.accuracy,
                }
                for c in self.combos
            ],
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Measurements:
        if d.get("kind") != KIND or d.get("version") != VERSION:
            raise ConfigError(f"not a version-{VERSION} {KIND} file")
        try:
            arr = lambda v: np.asarray(v, dtype=np.float64)  # noqa: E731
            costs = CostTable(
                tuple(str(n) for n in d["block_names"]),
                tuple(float(r) for r in d["ratios"]),
                *(arr(d["blocks"][k]) for k in _COST_KEYS),
            )
            return cls(
                model_name=str(d["model"]),
                model_hash=str(d["model_hash"]),
                num_classes=int(d["num_classes"]),
                costs=costs,
                ranges=tuple((int(r[0]), int(r[1])) for r in d["ranges"]),
                range_time_s=arr(d["range_time_s"]),
                range_accuracy=arr(d["range_accuracy"]),
                combos=tuple(
                    Combo(
                        tuple((int(x[0]), int(x[1])) for x in c["bounds"]),
                        tuple(int(v) for v in c["levels"]),
                        float(c["accuracy"]),
                    )
                    for c in d["combos"]
                ),
                meta=dict(d.get("meta", {})),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ConfigError(f"malformed measurements: {exc!r}") from exc

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Measurements:
        return cls.from_dict(read_json(path, "measurements"))


class SliceBank:
    """Prunable slices of one checkpoint, built once per range and reused."""

    def __init__(
        self, ckpt: Checkpoint, ratios: Sequence[float] = DEFAULT_RATIOS, round_to: int = 8
    ) -> None:
        self.ckpt = ckpt
        self.model = ckpt.build()
        self.ratios = validate_ratios(ratios)
        self.round_to = round_to
        self._slices: dict[Range, PrunableSlice] = {}

    def get(self, i: int, j: int) -> PrunableSlice:
        if (i, j) not in self._slices:
            with torch.enable_grad():  # Torch-Pruning traces the slice with autograd
                self._slices[(i, j)] = build_prunable(
                    self.ckpt,
                    SliceBounds(i, j),
                    ratios=self.ratios,
                    round_to=self.round_to,
                    recalibrate_bn=self.ckpt.calibration_images is not None,
                    model=self.model,
                )
        return self._slices[(i, j)]

    def slices(self, bounds: Sequence[Range]) -> list[PrunableSlice]:
        """The slices ``bounds``, in order (what
        :func:`~pipeline.calibration.accuracy.accuracy_at_levels` runs)."""
        return [self.get(i, j) for i, j in bounds]


def measure_costs(
    bank: SliceBank, inputs: Sequence[torch.Tensor], *, runs: int, warmup: int, ranges: bool = True
) -> tuple[CostTable, NDArray[np.float64] | None]:
    """The per-block cost table of ``bank``'s model and, with ``ranges``, the measured latency
    of every contiguous range ``[R, L]``. ``inputs[b]``: a full-width input of block b
    (batch 1); times are medians of the thread's CPU time at batch 1 on one thread (on a
    shared machine, wall time also counts other processes' turns on the core)."""
    n, n_levels = bank.model.num_blocks, len(bank.ratios)
    params, activation, output = (np.zeros((n, n_levels)) for _ in range(3))
    for b in range(n):
        x = inputs[b][:1]
        for lv, v in enumerate(bank.get(b, b + 1).variants):
            peak, y = peak_bytes(v.module, x)
            out_b = y.numel() * FLOAT_BYTES
            params[b, lv] = v.params * FLOAT_BYTES
            activation[b, lv] = x.numel() * FLOAT_BYTES + 2 * max(peak, out_b)
            output[b, lv] = out_b + (0 if v.out_channels is None else len(v.out_channels) * 4)
    todo = contiguous_ranges(n) if ranges else [(b, b + 1) for b in range(n)]
    timed = measure_latency(
        bank.slices(todo), [inputs[i] for i, _ in todo], runs=runs, warmup=warmup
    )
    times = np.asarray([[t.median("cpu") for t in per_range] for per_range in timed])
    idx = {r: k for k, r in enumerate(todo)}
    block_time = np.asarray([times[idx[(b, b + 1)]] for b in range(n)])
    table = CostTable(
        tuple(bank.model.block_names()), bank.ratios, block_time, params, activation, output
    )
    return table, times if ranges else None


def split_halves(data: ArrayDataset, seed: int = 0) -> tuple[ArrayDataset, ArrayDataset]:
    """``data`` cut in two seeded, stratified halves (``<name>/a``, ``<name>/b``). The planner's
    measured veto uses half a of the validation split and its margin is chosen on half b, so
    that the test split is left for the final figure."""
    rng = np.random.default_rng(seed)
    a: list[NDArray[np.intp]] = []
    b: list[NDArray[np.intp]] = []
    for c in np.unique(data.labels):
        idx = np.flatnonzero(data.labels == c)
        idx = idx[rng.permutation(len(idx))]
        a.append(idx[: len(idx) // 2])
        b.append(idx[len(idx) // 2 :])
    return (
        data.subset(np.sort(np.concatenate(a)), f"{data.name}/a"),
        data.subset(np.sort(np.concatenate(b)), f"{data.name}/b"),
    )


def sample_combos(
    base: AccuracyModel, n: int, count: int, seed: int = 0, region: float = 0.8
) -> list[tuple[tuple[Range, ...], tuple[int, ...]]]:
    """Seeded random partitions with random levels, at least two slices pruned, whose
    additive prediction (``kappa = 1``, the most pessimistic) is at least ``region``: the
    combos that say how pruning compounds where the planner works."""
    rng = np.random.default_rng(seed)
    index = {r: k for k, r in enumerate(contiguous_ranges(n))}
    out: list[tuple[tuple[Range, ...], tuple[int, ...]]] = []
    for _ in range(2000 * count):
        if len(out) == count:
            break
        cuts = [c for c in range(1, n) if rng.random() < 0.5]
        bounds = tuple(itertools.pairwise([0, *cuts, n]))
        levels = tuple(int(v) for v in rng.integers(0, base.delta.shape[1], len(bounds)))
        units = [index[b] for b in bounds]
        if (
            sum(lv > 0 for lv in levels) >= 2
            and (bounds, levels) not in out
            and base.predict_one(units, levels) >= region
        ):
            out.append((bounds, levels))
    return out


def measure(
    ckpt: Checkpoint,
    data: ArrayDataset,
    *,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    round_to: int = 8,
    runs: int = 60,
    warmup: int = 10,
    combos: int = 40,
    seed: int = 0,
    split: str = "val",
    progress: bool = True,
) -> Measurements:
    """Measure costs, importance and combos (see the module docstring) on ``data``."""
    from tqdm import tqdm

    from pipeline.profiling import machine_info, now_iso

    started = time.perf_counter()
    bank = SliceBank(ckpt, ratios, round_to)
    n, n_levels = bank.model.num_blocks, len(bank.ratios)
    ranges = contiguous_ranges(n)
    x, y = ckpt.preprocess(data.images), torch.from_numpy(data.labels)
    steps = len(ranges) * n_levels + combos
    with tqdm(total=steps, desc="measure", unit="step", disable=not progress, leave=False) as bar:
        act = block_inputs(bank.model, x)
        for i, j in ranges:  # build every range (BatchNorm re-estimated per level)
            bank.get(i, j)
            bar.update(1)
        t0 = time.perf_counter()
        costs, range_time = measure_costs(bank, act, runs=runs, warmup=warmup)
        latency_s = time.perf_counter() - t0
        unpruned = float((act[-1].argmax(1) == y).float().mean())
        range_acc = np.full((len(ranges), n_levels), unpruned)
        for k, (i, j) in enumerate(ranges):  # only [i, j) pruned: from its cached input
            tail = [(j, n)] if j < n else []
            range_acc[k, 1:] = accuracy_at_levels(
                bank.slices([(i, j), *tail]),
                [(level,) + (0,) * len(tail) for level in range(1, n_levels)],
                act[i],
                y,
                on_point=lambda: bar.update(1),
            )
        base = AccuracyModel.from_importance(unpruned, range_acc, ckpt.config.num_classes)
        measured = []
        for bounds, levels in sample_combos(base, n, combos, seed):
            accuracy = accuracy_at_levels(bank.slices(bounds), [levels], x, y)[0]
            measured.append(Combo(bounds, levels, accuracy))
            bar.update(1)
    meta = {
        "created": now_iso(),
        "machine": machine_info(1),
        "split": split,
        "dataset": data.name,
        "samples": len(data),
        "round_to": round_to,
        "latency": {
            "threads": 1,
            "batch": 1,
            "statistic": "median",
            "runs": runs,
            "warmup": warmup,
            "seconds": latency_s,
        },
        "checkpoint": str(ckpt.path) if ckpt.path else None,
        "combo_seed": seed,
        "seconds": time.perf_counter() - started,
    }
    log.info(
        "measured %d blocks x %d levels, %d ranges, %d combos in %.0f s",
        n,
        n_levels,
        len(ranges),
        len(measured),
        meta["seconds"],
    )
    return Measurements(
        ckpt.config.name,
        ckpt.model_hash(),
        ckpt.config.num_classes,
        costs,
        tuple(ranges),
        range_time if range_time is not None else np.zeros_like(range_acc),
        range_acc,
        tuple(measured),
        meta,
    )


def default_cache(ckpt: Checkpoint, root: Path = Path("runs/slimedge")) -> Path:
    return root / f"measurements-{ckpt.config.name}-{ckpt.model_hash()}.json"


def load_or_measure(
    ckpt: Checkpoint,
    data: ArrayDataset | Callable[[], ArrayDataset],
    cache: Path | None = None,
    **kwargs: Any,
) -> Measurements:
    """The cached measurements of this checkpoint (by weight hash), measured if missing.
    ``data`` may be a function that loads the held-out data: called only to measure."""
    path = cache or default_cache(ckpt)
    if path.exists():
        m = Measurements.load(path)
        if m.model_hash == ckpt.model_hash():
            return m
        log.info("%s belongs to another model; measuring again", path)
    m = measure(ckpt, data() if callable(data) else data, **kwargs)
    m.save(path)
    log.info("measurements cached at %s", path)
    return m
