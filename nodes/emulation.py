"""Honest device emulation: a node runs the real computation, then waits (k - 1) times the
measured compute time, so that it behaves like a device k times slower.

``k`` is a constant factor times the factor of any transient slowdown window in force (times are
seconds since the node started, or since the experiment's common start time).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import ConfigError


@dataclass(frozen=True)
class SlowdownWindow:
    start_s: float
    end_s: float
    factor: float

    def __post_init__(self) -> None:
        if self.end_s <= self.start_s or self.start_s < 0:
            raise ConfigError(f"slowdown window [{self.start_s}, {self.end_s}) is empty")
        if self.factor < 1.0:
            raise ConfigError(f"slowdown factor must be >= 1, got {self.factor}")


@dataclass(frozen=True)
class Emulation:
    """A constant slowdown factor and a schedule of transient slowdowns."""

    factor: float = 1.0
    windows: tuple[SlowdownWindow, ...] = field(default_factory=tuple)
    cpu_hog: bool = False  # also burn a real CPU core during windows (see nodes.hog)

    def __post_init__(self) -> None:
        if self.factor < 1.0:
            raise ConfigError(f"slowdown factor must be >= 1, got {self.factor}")

    @property
    def active(self) -> bool:
        return self.factor != 1.0 or bool(self.windows)

    def factor_at(self, t: float) -> float:
        k = self.factor
        for w in self.windows:
            if w.start_s <= t < w.end_s:
                k *= w.factor
        return k

    def extra_wait(self, t: float, compute_s: float) -> float:
        """Seconds to wait after a computation of ``compute_s`` that started at time ``t``."""
        return (self.factor_at(t) - 1.0) * compute_s

    def describe(self) -> str:
        parts = [f"constant x{self.factor:g}"] if self.factor != 1.0 else []
        parts += [f"x{w.factor:g} during [{w.start_s:g}, {w.end_s:g}) s" for w in self.windows]
        return ", ".join(parts) if parts else "none"

    def to_dict(self) -> dict[str, Any]:
        return {
            "factor": self.factor,
            "cpu_hog": self.cpu_hog,
            "windows": [[w.start_s, w.end_s, w.factor] for w in self.windows],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Emulation:
        windows = tuple(_window(w) for w in data.get("windows", ()))
        return cls(float(data.get("factor", 1.0)), windows, bool(data.get("cpu_hog", False)))

    @classmethod
    def parse(
        cls, factor: float = 1.0, windows: Iterable[str] = (), cpu_hog: bool = False
    ) -> Emulation:
        """Windows as ``START:END:FACTOR`` strings (seconds), e.g. ``20:40:3``."""
        parsed = []
        for text in windows:
            try:
                a, b, k = (float(v) for v in text.split(":"))
            except ValueError as exc:
                raise ConfigError(f"slowdown window {text!r} is not START:END:FACTOR") from exc
            parsed.append(SlowdownWindow(a, b, k))
        return cls(factor, tuple(parsed), cpu_hog)


def _window(value: Any) -> SlowdownWindow:
    if isinstance(value, Mapping):
        return SlowdownWindow(float(value["start"]), float(value["end"]), float(value["factor"]))
    a, b, k = value
    return SlowdownWindow(float(a), float(b), float(k))
