"""The calibration file: what each slice costs at each level, and what accuracy a vector of
per-slice ratios gives — raw points and fits, for one model and one plan.

    t_i(p) = a_i p + b_i                                   (per slice, on its device)
    a(p)   = lo + (hi - lo) / (1 + exp(-(sum_i g_i p_i - d)))   (end to end)

The controller loads this file; ``edgeprune calibrate`` writes it (JSON, with the hashes of the
model and plan it belongs to, so a stale file is detected).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.calibration.accuracy import LogisticAccuracyFit
from pipeline.calibration.latency import LinearFit
from pipeline.errors import ConfigError
from pipeline.jsonfile import read_json

CALIBRATION_VERSION = 1


@dataclass(frozen=True)
class SliceLatency:
    """Measured latency of one slice at each level on its device, and the linear fit."""

    stage: int
    start: int
    end: int
    device: str
    points: tuple[tuple[float, float], ...]  # (ratio, seconds)
    fit: LinearFit

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "start": self.start,
            "end": self.end,
            "device": self.device,
            "points": [list(p) for p in self.points],
            "fit": self.fit.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SliceLatency:
        return cls(
            int(d["stage"]),
            int(d["start"]),
            int(d["end"]),
            str(d["device"]),
            tuple((float(r), float(t)) for r, t in d["points"]),
            LinearFit.from_dict(d["fit"]),
        )


@dataclass(frozen=True)
class Calibration:
    ratios: tuple[float, ...]
    slices: tuple[SliceLatency, ...]
    accuracy_points: tuple[tuple[tuple[float, ...], float], ...]  # (per-slice ratios, acc)
    accuracy_fit: LogisticAccuracyFit
    model_hash: str
    plan_hash: str
    num_classes: int
    meta: dict[str, Any] = field(default_factory=dict)  # machine, versions, split, samples...

    def __post_init__(self) -> None:
        if not self.slices:
            raise ConfigError("a calibration needs at least one slice")
        if self.accuracy_fit.n_slices != len(self.slices):
            raise ConfigError("the accuracy fit and the slice list disagree on the slice count")

    def mismatch(self, model_hash: str, plan_hash: str, ratios: Sequence[float]) -> str | None:
        """Why this calibration does not belong to the model ``model_hash`` placed as
        ``plan_hash`` at levels ``ratios`` (None when it does): a stale file must not feed the
        controller."""
        if self.model_hash != model_hash:
            return f"it is for model {self.model_hash}, the checkpoint is {model_hash}"
        if self.plan_hash != plan_hash:
            return f"it is for plan {self.plan_hash}, the placement's is {plan_hash}"
        if tuple(self.ratios) != tuple(ratios):
            return f"its levels {list(self.ratios)} differ from {list(ratios)}"
        return None

    @property
    def unpruned_accuracy(self) -> float:
        zero = tuple(0.0 for _ in self.slices)
        for ratios, acc in self.accuracy_points:
            if tuple(ratios) == zero:
                return acc
        return float(self.accuracy_fit.predict(zero))

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "calibration",
            "version": CALIBRATION_VERSION,
            "model_hash": self.model_hash,
            "plan_hash": self.plan_hash,
            "num_classes": self.num_classes,
            "ratios": list(self.ratios),
            "slices": [s.to_dict() for s in self.slices],
            "accuracy": {
                "points": [{"ratios": list(r), "accuracy": a} for r, a in self.accuracy_points],
                "fit": self.accuracy_fit.to_dict(),
            },
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibration:
        if d.get("kind") != "calibration" or d.get("version") != CALIBRATION_VERSION:
            raise ConfigError(f"not a version-{CALIBRATION_VERSION} calibration file")
        try:
            return cls(
                ratios=tuple(float(r) for r in d["ratios"]),
                slices=tuple(SliceLatency.from_dict(s) for s in d["slices"]),
                accuracy_points=tuple(
                    (tuple(float(r) for r in p["ratios"]), float(p["accuracy"]))
                    for p in d["accuracy"]["points"]
                ),
                accuracy_fit=LogisticAccuracyFit.from_dict(d["accuracy"]["fit"]),
                model_hash=str(d["model_hash"]),
                plan_hash=str(d["plan_hash"]),
                num_classes=int(d["num_classes"]),
                meta=dict(d.get("meta", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"malformed calibration: {exc!r}") from exc

    def save(self, path: Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, path: Path) -> Calibration:
        return cls.from_dict(read_json(path, "calibration"))
