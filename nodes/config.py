"""Configuration of a slice node: command line, TOML file, or both (the command line wins)."""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from bus.connection import MqttSettings
from bus.topics import check_name
from nodes.emulation import Emulation
from pipeline import codec
from pipeline.errors import ConfigError
from pipeline.placement import SliceBounds
from pipeline.pruning import DEFAULT_RATIOS, validate_ratios


@dataclass(frozen=True)
class NodeConfig:
    """Everything a slice node needs.

    ``stage`` and ``bounds`` may be left out: the node then takes them from the retained plan
    (``control/plan``), looking itself up by ``node_id``.
    """

    node_id: str
    pipe: str = "default"
    stage: int | None = None
    bounds: SliceBounds | None = None
    checkpoint: Path | None = None  # None: the default checkpoint
    mqtt: MqttSettings = field(default_factory=MqttSettings)
    ratios: tuple[float, ...] = DEFAULT_RATIOS
    round_to: int = 8
    recalibrate_bn: bool = True
    float16: bool = False  # send activations as float16 (half the bytes)
    queue_size: int = 512  # local queue bound; requests beyond it are shed and reported
    metrics_interval_s: float = 1.0
    threads: int = 1  # torch threads for this node
    # below the broker's max_packet_size, so an oversized message reaches the node's error path
    max_payload_bytes: int = codec.DEFAULT_MAX_BYTES
    emulation: Emulation = field(default_factory=Emulation)
    clock_start: float | None = None  # epoch seconds the emulation schedule counts from
    reconnect_max_s: float = 5.0

    def __post_init__(self) -> None:
        check_name("node", self.node_id)
        check_name("pipe", self.pipe)
        validate_ratios(self.ratios)
        if (self.stage is None) != (self.bounds is None):
            raise ConfigError(
                "give both stage and slice bounds, or neither (then the node "
                "waits for the retained plan)"
            )
        if self.stage is not None and self.stage < 0:
            raise ConfigError("stage must be >= 0")
        if self.queue_size < 1 or self.threads < 1 or self.metrics_interval_s <= 0:
            raise ConfigError("queue size, threads and metrics interval must be positive")
        if self.max_payload_bytes < 1024:
            raise ConfigError("max payload must be at least 1 KiB")

    @classmethod
    def from_toml(cls, path: Path, **overrides: Any) -> NodeConfig:
        """Read ``[node]`` (and optional ``[mqtt]``, ``[emulation]``) from a TOML file."""
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read node config {path}: {exc}") from exc
        return cls.from_mapping(data, **overrides)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], **overrides: Any) -> NodeConfig:
        node = dict(data.get("node", {}))
        known = {f.name for f in fields(cls)}
        unknown = set(node) - known - {"start", "end"}
        if unknown:
            raise ConfigError(f"unknown [node] keys: {sorted(unknown)}")
        if "start" in node or "end" in node:
            node["bounds"] = SliceBounds(int(node.pop("start")), int(node.pop("end")))
        if "checkpoint" in node:
            node["checkpoint"] = Path(node["checkpoint"])
        if "ratios" in node:
            node["ratios"] = tuple(float(r) for r in node["ratios"])
        if "mqtt" in data:
            m = dict(data["mqtt"])
            for key in ("tls_ca", "tls_cert", "tls_key"):
                if m.get(key):
                    m[key] = Path(m[key])
            node["mqtt"] = MqttSettings(**m)
        if "emulation" in data:
            node["emulation"] = Emulation.from_dict(data["emulation"])
        node.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**node)
        except TypeError as exc:
            raise ConfigError(f"bad node config: {exc}") from exc

    def with_placement(self, stage: int, bounds: SliceBounds) -> NodeConfig:
        return replace(self, stage=stage, bounds=bounds)
