"""One experiment from one TOML file: the trace, the plan, the emulated devices, the controller.

    [experiment]                 name, description, seed, policy, startup_timeout_s,
                                 startup_budget_s, warmup_images
    [model]                      checkpoint, calibration (created when missing or stale), ratios
    [plan]                       cuts (block indices), nodes (one name per slice), threads,
                                 pin_cpus, metrics_interval_s (nodes' metrics period)
    [trace]                      names, compression, max_idle_s, window, max_images, format,
                                 drain_s, resend_after_s
    [emulation.<node>]           factor, windows = [[start_s, end_s, factor], ...], cpu_hog,
                                 hog_windows = [[start_s, end_s], ...] (default: windows)
    [controller]                 every key of controller.config.ControllerConfig (slo_ms, a_min,
                                 objective, thresholds ...); the policy comes from [experiment]

Times of slowdown windows are seconds on the experiment clock: 0 is the moment the camera
starts replaying the (windowed, idle-capped, compressed) trace, so a window lines up with the
replayed bursts. Relative paths are relative to the working directory.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bus.topics import check_name
from controller.config import ControllerConfig, PolicySpec, parse_policy
from controller.optimizer import DEFAULT_RATIOS
from nodes.emulation import Emulation, SlowdownWindow
from pipeline.errors import ConfigError

_TABLES = {"experiment", "model", "plan", "trace", "emulation", "controller"}
_IMAGE_FORMATS = ("png", "jpeg", "raw")


@dataclass(frozen=True)
class TraceSettings:
    """What the camera replays and how (see ``edgeprune camera --help``)."""

    names: tuple[str, ...]
    compression: float = 1.0
    max_idle_s: float | None = None
    window: tuple[float, float] | None = None
    max_images: int | None = None
    image_format: str = "png"
    drain_s: float = 120.0  # how long the camera waits for outstanding results at the end
    resend_after_s: float = 0.0  # 0: never re-send (an overloaded pipeline is slow, not lossy)

    def __post_init__(self) -> None:
        if not self.names:
            raise ConfigError("[trace] names must list at least one trace")
        if not math.isfinite(self.compression) or self.compression <= 0:
            raise ConfigError(f"[trace] compression must be > 0, got {self.compression}")
        if self.max_idle_s is not None and self.max_idle_s < 0:
            raise ConfigError("[trace] max_idle_s must be >= 0")
        if self.window is not None and not 0 <= self.window[0] < self.window[1]:
            raise ConfigError(
                f"[trace] window must be [start, end], 0 <= start < end, got {list(self.window)}"
            )
        if self.max_images is not None and self.max_images < 1:
            raise ConfigError("[trace] max_images must be >= 1")
        if self.image_format not in _IMAGE_FORMATS:
            raise ConfigError(f"[trace] format must be one of {_IMAGE_FORMATS}")
        if self.drain_s <= 0 or self.resend_after_s < 0:
            raise ConfigError("[trace] drain_s must be > 0 and resend_after_s >= 0")

    def camera_args(self) -> list[str]:
        """The ``edgeprune camera`` flags for this replay."""
        args: list[str] = []
        for name in self.names:
            args += ["--trace", name]
        args += [
            "--compression",
            f"{self.compression:g}",
            "--format",
            self.image_format,
            "--drain",
            f"{self.drain_s:g}",
            "--resend-after",
            f"{self.resend_after_s:g}",
        ]
        if self.max_idle_s is not None:
            args += ["--max-idle", f"{self.max_idle_s:g}"]
        if self.window is not None:
            args += ["--window", f"{self.window[0]:g}:{self.window[1]:g}"]
        if self.max_images is not None:
            args += ["--max-images", str(self.max_images)]
        return args


@dataclass(frozen=True)
class NodeSpec:
    """One slice node: its name, stage, blocks and emulated device."""

    name: str
    stage: int
    start: int
    end: int
    emulation: Emulation = field(default_factory=Emulation)
    hog_windows: tuple[tuple[float, float], ...] = ()  # a real CPU hog beside the node

    def describe(self) -> str:
        text = (
            f"{self.name}: stage {self.stage}, blocks [{self.start}, {self.end}), "
            f"emulated slowdown {self.emulation.describe()}"
        )
        if self.hog_windows:
            spans = ", ".join(f"[{a:g}, {b:g}) s" for a, b in self.hog_windows)
            text += f"; real CPU hog on its core during {spans}"
        return text


@dataclass(frozen=True)
class ExperimentConfig:
    """A whole scenario; :func:`load_config` reads it from TOML."""

    name: str
    trace: TraceSettings
    cuts: tuple[int, ...]
    nodes: tuple[NodeSpec, ...]
    controller: Mapping[str, Any]  # the [controller] table, validated by ControllerConfig
    description: str = ""
    seed: int = 0
    policy: str = "reactive"
    checkpoint: Path | None = None  # None: the default checkpoint
    calibration: Path | None = None  # None: runs/calibration/<name>.json
    ratios: tuple[float, ...] | None = None  # None: the nodes' default levels
    threads: int = 1
    metrics_interval_s: float = 1.0  # how often nodes publish metrics (the controller's eyes)
    pin_cpus: bool = False  # pin node i (and its CPU hog) to core i mod the core count
    startup_timeout_s: float = 180.0  # give up when a process is not up after this long
    startup_budget_s: float = 45.0  # first run: launch -> shared clock start (then learnt)
    warmup_images: int = 10  # sent (and discarded) before the clock starts: no cold start
    source: Path | None = None  # the TOML file it was read from

    def __post_init__(self) -> None:
        check_name("experiment", self.name)
        self.check_policy(self.policy)
        if len(self.nodes) != len(self.cuts) + 1:
            raise ConfigError(
                f"{len(self.cuts)} cut(s) make {len(self.cuts) + 1} slices, "
                f"but {len(self.nodes)} node(s) are named"
            )
        if (
            self.threads < 1
            or self.startup_timeout_s <= 0
            or self.startup_budget_s <= 0
            or not self.metrics_interval_s > 0
        ):
            raise ConfigError(
                "threads, startup_timeout_s, startup_budget_s and metrics_interval_s must be > 0"
            )
        if self.warmup_images < 0:
            raise ConfigError("warmup_images must be >= 0")
        self.controller_config()  # validate early: a bad threshold fails before any process

    @property
    def n_levels(self) -> int:
        return len(self.ratios or DEFAULT_RATIOS)

    def check_policy(self, policy: str) -> PolicySpec:
        """The policy's spec; a static level this scenario's levels do not have is an error."""
        spec = parse_policy(policy)
        spec.check_levels(self.n_levels)
        return spec

    @property
    def slo_ms(self) -> float:
        return float(self.controller_config().slo_ms)

    @property
    def a_min(self) -> float:
        return float(self.controller_config().a_min)

    @property
    def calibration_path(self) -> Path:
        return self.calibration or Path("runs") / "calibration" / f"{self.name}.json"

    def controller_config(self, policy: str | None = None) -> ControllerConfig:
        """The controller's settings for ``policy`` (default: the experiment's)."""
        return ControllerConfig.from_mapping(
            {"controller": dict(self.controller)}, policy=policy or self.policy
        )

    def controller_toml(self, policy: str) -> str:
        """A ``[controller]`` table for ``edgeprune controller --config``."""
        values = {**self.controller, "policy": policy}
        lines = ["[controller]"]
        for key, value in values.items():
            lines.append(f"{key} = {_toml_value(value)}")
        return "\n".join(lines) + "\n"

    def with_overrides(self, **changes: Any) -> ExperimentConfig:
        """A copy with some fields replaced (None values are ignored)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def with_trace(self, **changes: Any) -> ExperimentConfig:
        """A copy with some [trace] settings replaced (None values are ignored)."""
        trace = replace(self.trace, **{k: v for k, v in changes.items() if v is not None})
        return replace(self, trace=trace)

    def emulation_summary(self) -> list[str]:
        """One line per node saying what was emulated (every report carries it)."""
        return [n.describe() for n in self.nodes]

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (reports carry the config that made them)."""
        return {
            "name": self.name,
            "description": self.description,
            "seed": self.seed,
            "policy": self.policy,
            "source": str(self.source) if self.source else None,
            "checkpoint": str(self.checkpoint) if self.checkpoint else None,
            "calibration": str(self.calibration_path),
            "cuts": list(self.cuts),
            "ratios": list(self.ratios) if self.ratios else None,
            "threads": self.threads,
            "metrics_interval_s": self.metrics_interval_s,
            "pin_cpus": self.pin_cpus,
            "trace": {
                "names": list(self.trace.names),
                "compression": self.trace.compression,
                "max_idle_s": self.trace.max_idle_s,
                "window": list(self.trace.window) if self.trace.window else None,
                "max_images": self.trace.max_images,
                "format": self.trace.image_format,
            },
            "nodes": [
                {
                    "name": n.name,
                    "stage": n.stage,
                    "blocks": [n.start, n.end],
                    "emulation": n.emulation.to_dict(),
                    "hog_windows": [list(w) for w in n.hog_windows],
                }
                for n in self.nodes
            ],
            "controller": dict(self.controller),
        }


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    raise ConfigError(f"[controller] values must be numbers, booleans or strings, got {value!r}")


def _table(data: Mapping[str, Any], name: str, known: set[str]) -> dict[str, Any]:
    table = data.get(name, {})
    if not isinstance(table, Mapping):
        raise ConfigError(f"[{name}] must be a table")
    unknown = set(table) - known
    if unknown:
        raise ConfigError(f"unknown [{name}] keys: {sorted(unknown)} (known: {sorted(known)})")
    return dict(table)


def _pair(value: Any, what: str) -> tuple[float, float]:
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 2:
        raise ConfigError(f"{what} must be [start, end], got {value!r}")
    return float(value[0]), float(value[1])


def _emulation(name: str, table: Mapping[str, Any]) -> tuple[Emulation, tuple]:
    known = {"factor", "windows", "cpu_hog", "hog_windows"}
    unknown = set(table) - known
    if unknown:
        raise ConfigError(f"unknown [emulation.{name}] keys: {sorted(unknown)}")
    windows = []
    for w in table.get("windows", []):
        if not isinstance(w, Sequence) or isinstance(w, str) or len(w) != 3:
            raise ConfigError(f"[emulation.{name}] windows are [start_s, end_s, factor], got {w!r}")
        windows.append(SlowdownWindow(float(w[0]), float(w[1]), float(w[2])))
    cpu_hog = bool(table.get("cpu_hog", False))
    emulation = Emulation(float(table.get("factor", 1.0)), tuple(windows), cpu_hog)
    hog: tuple[tuple[float, float], ...] = ()
    if "hog_windows" in table:
        hog = tuple(_pair(w, f"[emulation.{name}] hog_windows item") for w in table["hog_windows"])
    elif cpu_hog:
        hog = tuple((w.start_s, w.end_s) for w in windows)
    for a, b in hog:
        if not 0 <= a < b:
            raise ConfigError(f"[emulation.{name}] hog window [{a}, {b}) is empty")
    return emulation, hog


def config_from_mapping(data: Mapping[str, Any], source: Path | None = None) -> ExperimentConfig:
    """Build and validate an :class:`ExperimentConfig` from a parsed TOML document."""
    unknown = set(data) - _TABLES
    if unknown:
        raise ConfigError(f"unknown tables {sorted(unknown)} (known: {sorted(_TABLES)})")
    exp = _table(
        data,
        "experiment",
        {
            "name",
            "description",
            "seed",
            "policy",
            "startup_timeout_s",
            "startup_budget_s",
            "warmup_images",
        },
    )
    model = _table(data, "model", {"checkpoint", "calibration", "ratios"})
    plan = _table(data, "plan", {"cuts", "nodes", "threads", "pin_cpus", "metrics_interval_s"})
    trace = _table(
        data,
        "trace",
        {
            "names",
            "compression",
            "max_idle_s",
            "window",
            "max_images",
            "format",
            "drain_s",
            "resend_after_s",
        },
    )
    emulation = data.get("emulation", {})
    if not isinstance(emulation, Mapping):
        raise ConfigError("[emulation] must hold one table per node: [emulation.<node>]")
    if "cuts" not in plan or "nodes" not in plan:
        raise ConfigError("[plan] needs cuts (block indices) and nodes (one name per slice)")
    cuts = tuple(int(c) for c in plan["cuts"])
    names = tuple(str(n) for n in plan["nodes"])
    if len(set(names)) != len(names):
        raise ConfigError(f"[plan] node names must be unique, got {list(names)}")
    stray = set(emulation) - set(names)
    if stray:
        raise ConfigError(f"[emulation.*] names nodes not in [plan] nodes: {sorted(stray)}")
    edges = [0, *cuts, -1]  # the last edge is the model's block count, known at run time
    nodes = []
    for i, name in enumerate(names):
        check_name("node", name)
        emu, hog = _emulation(name, emulation.get(name, {}))
        nodes.append(
            NodeSpec(name, i, edges[i], edges[i + 1] if i + 1 < len(names) else -1, emu, hog)
        )
    trace_names = trace.get("names", [])
    if isinstance(trace_names, str):
        trace_names = [trace_names]
    settings = TraceSettings(
        names=tuple(str(n) for n in trace_names),
        compression=float(trace.get("compression", 1.0)),
        max_idle_s=None if trace.get("max_idle_s") is None else float(trace["max_idle_s"]),
        window=_pair(trace["window"], "[trace] window") if "window" in trace else None,
        max_images=int(trace["max_images"]) if "max_images" in trace else None,
        image_format=str(trace.get("format", "png")),
        drain_s=float(trace.get("drain_s", 120.0)),
        resend_after_s=float(trace.get("resend_after_s", 0.0)),
    )
    name = str(exp.get("name") or (source.stem if source else "experiment"))
    return ExperimentConfig(
        name=name,
        trace=settings,
        cuts=cuts,
        nodes=tuple(nodes),
        controller=_table(data, "controller", set(ControllerConfig.keys())),
        description=str(exp.get("description", "")),
        seed=int(exp.get("seed", 0)),
        policy=str(exp.get("policy", "reactive")),
        checkpoint=Path(model["checkpoint"]) if model.get("checkpoint") else None,
        calibration=Path(model["calibration"]) if model.get("calibration") else None,
        ratios=tuple(float(r) for r in model["ratios"]) if "ratios" in model else None,
        threads=int(plan.get("threads", 1)),
        metrics_interval_s=float(plan.get("metrics_interval_s", 1.0)),
        pin_cpus=bool(plan.get("pin_cpus", False)),
        startup_timeout_s=float(exp.get("startup_timeout_s", 180.0)),
        startup_budget_s=float(exp.get("startup_budget_s", 45.0)),
        warmup_images=int(exp.get("warmup_images", 10)),
        source=source,
    )


def load_config(path: str | Path) -> ExperimentConfig:
    """Read an experiment TOML file.

    Raises:
        ConfigError: unreadable file, unknown table or key, or an invalid value.
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read experiment config {path}: {exc}") from exc
    return config_from_mapping(data, source=path)


def resolve_blocks(config: ExperimentConfig, num_blocks: int) -> ExperimentConfig:
    """Fill in the last slice's end (the model's block count) and check the cuts."""
    from pipeline.slicing import parse_cuts

    bounds = parse_cuts(list(config.cuts), num_blocks)
    nodes = tuple(
        replace(n, start=b.start, end=b.end) for n, b in zip(config.nodes, bounds, strict=True)
    )
    return replace(config, nodes=nodes)
