"""The calibration an experiment's controller loads: reused when it matches, measured otherwise.

A calibration file belongs to one model (its weight hash) and one placement (slice bounds and
node names: the plan hash) at one set of levels. :func:`ensure_calibration` reuses the file at
the experiment's calibration path when all three match, and otherwise runs
:func:`pipeline.calibration.measure.calibrate` (on this machine, one thread, the validation
split) and writes it there, so a replaced checkpoint or a changed plan never feeds the
controller stale curves.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from experiment.config import ExperimentConfig
from pipeline.calibration import Calibration
from pipeline.checkpoint import DEFAULT_CHECKPOINT, Checkpoint, load_checkpoint
from pipeline.errors import CheckpointError, ConfigError
from pipeline.placement import SliceBounds
from pipeline.pruning import DEFAULT_RATIOS

log = logging.getLogger(__name__)

TRAIN_HINT = (
    "train it with `edgeprune train` (about 4 minutes on 2 cores; it writes "
    "models/resnet-s.pt), or point [model] checkpoint at an existing one"
)


@dataclass(frozen=True)
class CalibrationInfo:
    path: Path
    created: bool  # measured by this run (else reused)
    model_hash: str
    plan_hash: str
    unpruned_accuracy: float
    conditions: dict[str, object] | None = None  # machine load when it was measured

    def to_dict(self) -> dict[str, object]:
        return {
            "path": str(self.path),
            "created": self.created,
            "model_hash": self.model_hash,
            "plan_hash": self.plan_hash,
            "unpruned_accuracy": self.unpruned_accuracy,
            "measured_under": self.conditions,
        }


def conditions_path(path: Path) -> Path:
    """Where the load a calibration was measured under is kept, beside it."""
    return path.with_suffix(".conditions.json")


def machine_load() -> dict[str, float]:
    """The machine's load now: a calibration times the slices on this machine, so one
    measured while other jobs compete for the cores has inflated times (the same model and
    plan, 11 minutes apart on a 2-core VM: 1.0 ms and then 2.0 ms for one slice)."""
    load1, load5, _ = os.getloadavg()
    return {"at": time.time(), "load1": load1, "load5": load5, "cpus": float(os.cpu_count() or 1)}


def read_conditions(path: Path) -> dict[str, object] | None:
    try:
        data = json.loads(conditions_path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def checkpoint_path(config: ExperimentConfig) -> Path:
    return Path(config.checkpoint) if config.checkpoint else DEFAULT_CHECKPOINT


def load_model(config: ExperimentConfig) -> Checkpoint:
    """The experiment's checkpoint; a missing file gets an error that says how to make one."""
    path = checkpoint_path(config)
    if not path.is_file():
        raise ConfigError(f"no model checkpoint at {path}: {TRAIN_HINT}")
    try:
        return load_checkpoint(path)
    except CheckpointError as exc:
        raise ConfigError(f"cannot load the checkpoint {path}: {exc}; {TRAIN_HINT}") from exc


def ensure_calibration(
    config: ExperimentConfig, ckpt: Checkpoint, data_dir: Path, *, progress: bool = True
) -> CalibrationInfo:
    """Reuse or (re)create the calibration at ``config.calibration_path``."""
    from pipeline.calibration.measure import CalibrationSettings, calibrate, plan_hash_of

    bounds = [SliceBounds(n.start, n.end) for n in config.nodes]
    names = [n.name for n in config.nodes]
    ratios = tuple(config.ratios or DEFAULT_RATIOS)
    model_hash = ckpt.model_hash()
    plan_hash = plan_hash_of(bounds, names)
    path = config.calibration_path
    if path.is_file():
        try:
            cal = Calibration.load(path)
            why = cal.mismatch(model_hash, plan_hash, ratios)
        except ConfigError as exc:
            why = str(exc)
        if why is None:
            conditions = read_conditions(path)
            log.info(
                "reusing the calibration %s (measured under load %s)",
                path,
                "unknown" if conditions is None else f"{conditions.get('load1', 0):.1f}",
            )
            return CalibrationInfo(
                path, False, model_hash, plan_hash, cal.unpruned_accuracy, conditions
            )
        log.warning("recalibrating: %s does not fit (%s)", path, why)
    else:
        log.info("no calibration at %s: measuring one (about a minute)", path)
    from pipeline.data import load_dataset, split_dataset

    data = split_dataset(load_dataset("animal-mnist", data_dir)).val
    before = machine_load()
    if before["load1"] > before["cpus"]:
        log.warning(
            "measuring the calibration on a busy machine (load %.1f on %.0f cores): its times "
            "will be inflated; delete %s and run again on a quiet machine for a clean one",
            before["load1"],
            before["cpus"],
            path,
        )
    cal = calibrate(
        ckpt,
        data,
        bounds=bounds,
        nodes=names,
        settings=CalibrationSettings(ratios=ratios),
        split="val",
        progress=progress,
    )
    cal.save(path)
    after = machine_load()
    measured: dict[str, object] = {**after, "load1_before": before["load1"]}
    conditions_path(path).write_text(json.dumps(measured), encoding="utf-8")
    log.info("calibration written to %s", path)
    return CalibrationInfo(path, True, model_hash, plan_hash, cal.unpruned_accuracy, measured)
