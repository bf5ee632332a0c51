"""Configuration of the controller: every threshold and window, from TOML ``[controller]``, the
command line, or both (the command line wins). See docs/controller.md for what each key does.

Latency thresholds are in milliseconds (``slo_ms``, ``margin_ms``, ``restore_below_ms``), the
way people state an SLO; windows and durations are in seconds (``*_s``).
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

from controller.policy import ProactiveConfig, ReactiveConfig
from pipeline.errors import ConfigError

ObjectiveName = Literal["bottleneck", "sum"]
PolicyKind = Literal["static", "reactive", "proactive", "oracle"]
POLICIES: tuple[str, ...] = ("static", "reactive", "proactive", "oracle")
POLICY_FORMS = "static, static:<level>, reactive, proactive or oracle"
PolicyName = str  # a policy as written: see parse_policy
OBJECTIVES: tuple[str, ...] = ("bottleneck", "sum")

# Per-policy defaults of the keys both trigger policies have (None in the config = these).
REACTIVE_DEFAULTS = {"sustain_s": 5.0, "restore_sustain_s": 30.0}
PROACTIVE_DEFAULTS = {"sustain_s": 1.0, "restore_sustain_s": 20.0}

_INT_KEYS = frozenset({"min_samples", "min_arrivals"})
_STR_KEYS = frozenset({"policy", "objective"})
_OPTIONAL_KEYS = frozenset({"sustain_s", "restore_sustain_s", "restore_below_ms"})


@dataclass(frozen=True)
class PolicySpec:
    """A policy as named on the command line or in a config: ``reactive``, ``proactive``,
    ``oracle`` (experiments only: it needs the scenario's slowdown schedule), or ``static:<level>``
    (every stage held at one level from the start; ``static`` is ``static:0``)."""

    kind: PolicyKind
    level: int = 0

    @property
    def name(self) -> str:
        return f"static:{self.level}" if self.kind == "static" else self.kind

    def check_levels(self, n_levels: int) -> None:
        """Raise when a static level does not exist among ``n_levels`` levels."""
        if self.kind == "static" and not 0 <= self.level < n_levels:
            raise ConfigError(
                f"policy {self.name}: level {self.level} does not exist; the levels are "
                f"0..{n_levels - 1}"
            )


def parse_policy(text: str) -> PolicySpec:
    """A :class:`PolicySpec` from its name (``static:5``, ``reactive`` ...).

    Raises:
        ConfigError: an unknown policy, or a static level that is not a non-negative integer.
    """
    if not isinstance(text, str):
        raise ConfigError(f"policy must be one of {POLICY_FORMS}, got {text!r}")
    name = text.strip()
    kind, sep, level = name.partition(":")
    if kind == "static" and sep:
        if not level.isdigit():
            raise ConfigError(
                f"policy {name!r}: static:<level> needs a level that is a non-negative "
                "integer, e.g. static:5"
            )
        return PolicySpec("static", int(level))
    if sep or kind not in POLICIES:
        raise ConfigError(f"policy must be one of {POLICY_FORMS}, got {text!r}")
    return PolicySpec(kind)  # type: ignore[arg-type]


@dataclass(frozen=True)
class ControllerConfig:
    """What the controller aims at (SLO, A_min), how it decides (policy, objective), and every
    threshold and window of its trigger, capacity and slowdown estimates."""

    slo_ms: float
    a_min: float = 0.8
    policy: str = "reactive"  # see parse_policy
    objective: ObjectiveName = "bottleneck"
    # reactive trigger (the paper's): a quantile of end-to-end latency over a sliding window
    margin_ms: float = 0.0
    quantile: float = 0.95
    window_s: float = 2.0
    sustain_s: float | None = None  # reactive 5 s, proactive 1 s
    cooldown_s: float = 10.0
    restore_below_ms: float | None = None  # default 0.6 x SLO
    restore_sustain_s: float | None = None  # reactive 30 s, proactive 20 s
    min_samples: int = 10
    # capacity: utilisation thresholds (proactive trigger) and the planning target (all)
    rho_high: float = 0.9
    rho_target: float = 0.75
    rho_low: float = 0.5
    rate_tau_s: float = 5.0
    metrics_max_age_s: float = 5.0
    min_arrivals: int = 5
    escalate_after_s: float = 2.0  # proactive: a further prune within the cooldown after this
    # live slowdown of each stage: measured service time / calibrated t_i(level)
    slowdown_window_s: float = 2.0
    slowdown_tau_s: float = 1.0
    slowdown_min: float = 0.1
    slowdown_max: float = 1000.0
    # loop
    decide_interval_s: float = 0.2
    status_interval_s: float = 30.0
    reconnect_max_s: float = 5.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _STR_KEYS:
                continue
            if value is None and f.name in _OPTIONAL_KEYS:
                continue
            if f.name in _INT_KEYS:
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ConfigError(f"{f.name} must be a positive integer, got {value!r}")
                continue
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
            ):
                raise ConfigError(f"{f.name} must be a finite number, got {value!r}")
        parse_policy(self.policy)
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if not 0.0 <= self.a_min < 1.0:
            raise ConfigError(f"a_min must be in [0, 1), got {self.a_min}")
        for name in ("slowdown_window_s", "slowdown_tau_s", "decide_interval_s", "reconnect_max_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.status_interval_s < 0:
            raise ConfigError(
                f"status_interval_s must be >= 0 (0: off), got {self.status_interval_s}"
            )
        if not 0 < self.slowdown_min <= 1.0 <= self.slowdown_max:
            raise ConfigError(
                f"need 0 < slowdown_min <= 1 <= slowdown_max, got "
                f"{self.slowdown_min}, {self.slowdown_max}"
            )
        # the policies validate the rest (SLO, quantile, windows, rho ordering ...)
        self.reactive_config()
        self.proactive_config()

    @property
    def policy_spec(self) -> PolicySpec:
        return parse_policy(self.policy)

    @property
    def slo_s(self) -> float:
        return self.slo_ms / 1e3

    def reactive_config(self) -> ReactiveConfig:
        return ReactiveConfig(
            slo_s=self.slo_s,
            margin_s=self.margin_ms / 1e3,
            quantile=self.quantile,
            window_s=self.window_s,
            cooldown_s=self.cooldown_s,
            sustain_s=_pick(self.sustain_s, REACTIVE_DEFAULTS["sustain_s"]),
            restore_sustain_s=_pick(self.restore_sustain_s, REACTIVE_DEFAULTS["restore_sustain_s"]),
            restore_below_s=None if self.restore_below_ms is None else self.restore_below_ms / 1e3,
            min_samples=self.min_samples,
        )

    def proactive_config(self) -> ProactiveConfig:
        return ProactiveConfig(
            slo_s=self.slo_s,
            rho_high=self.rho_high,
            rho_target=self.rho_target,
            rho_low=self.rho_low,
            cooldown_s=self.cooldown_s,
            sustain_s=_pick(self.sustain_s, PROACTIVE_DEFAULTS["sustain_s"]),
            restore_sustain_s=_pick(
                self.restore_sustain_s, PROACTIVE_DEFAULTS["restore_sustain_s"]
            ),
            rate_tau_s=self.rate_tau_s,
            metrics_max_age_s=self.metrics_max_age_s,
            min_arrivals=self.min_arrivals,
            escalate_after_s=self.escalate_after_s,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], **overrides: Any) -> ControllerConfig:
        """From the ``[controller]`` table of a parsed TOML document (other tables are ignored);
        ``overrides`` that are not None win."""
        table = data.get("controller", {})
        if not isinstance(table, Mapping):
            raise ConfigError("[controller] must be a table")
        values = dict(table)
        unknown = set(values) - set(cls.keys())
        if unknown:
            raise ConfigError(
                f"unknown [controller] keys: {sorted(unknown)} (known: {', '.join(cls.keys())})"
            )
        bad = set(overrides) - set(cls.keys())
        if bad:
            raise ConfigError(f"unknown controller settings: {sorted(bad)}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        if "slo_ms" not in values:
            raise ConfigError("the SLO is required: give --slo-ms or slo_ms in [controller]")
        for key in set(values) - _INT_KEYS - _STR_KEYS:
            if isinstance(values[key], int) and not isinstance(values[key], bool):
                values[key] = float(values[key])
        return cls(**values)

    @classmethod
    def from_toml(cls, path: Path, **overrides: Any) -> ControllerConfig:
        """Read ``[controller]`` from a TOML file; ``overrides`` (the command line) win."""
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read controller config {path}: {exc}") from exc
        return cls.from_mapping(data, **overrides)


def _pick(value: float | None, default: float) -> float:
    return default if value is None else value
