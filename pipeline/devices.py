"""The device model: one :class:`Device` type and one loader for device files, used by every
command that takes ``--devices`` (``partition``, ``plan``, ``calibrate``, ``controller
--failover``) and by the planners.

A device file is TOML with one ``[[device]]`` table per device, in pipeline order::

    [[device]]
    name = "pi4-a"          # the node id of the slice node that runs on it (required)
    speed = 0.10            # relative to the reference machine: 2.0 = twice as fast
    memory_mb = 1024        # what a slice may use for weights and activations, MiB (required)
    bandwidth_mbps = 100    # its link to the next stage, 10^6 bit/s (required)
    latency_ms = 2.0        # per hop through the broker, ms (required)
    failure_prob = 0.0      # chance of failing within the planning horizon (default 0)
    profile = "pi4.json"    # optional: the device's own `edgeprune profile` (see below)

The reference machine is the one that measured the times the device is compared with (the
profile of ``partition``, the cost table of ``plan``, the latencies of ``calibrate``).
``speed`` is required unless ``profile`` is given: then the device's own measured block times
are used instead of speed scaling (``speed`` may still be written; the profile wins). A
relative ``profile`` path is relative to the device file's folder.

One set of rules, checked here and nowhere else: every key is known, every required key is
present, numbers are finite (``speed``, ``memory_mb``, ``bandwidth_mbps`` > 0; ``latency_ms``
>= 0; ``0 <= failure_prob < 1``), names are non-empty and unique. Errors are
:class:`~pipeline.errors.ConfigError` naming the file, the device and the key.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError

MIB = 1 << 20
REQUIRED_KEYS = ("name", "memory_mb", "bandwidth_mbps", "latency_ms")
OPTIONAL_KEYS = ("speed", "failure_prob", "profile")


def finite_number(
    value: Any,
    what: str,
    *,
    minimum: float | None = None,
    positive: bool = False,
    below: float | None = None,
) -> float:
    """``value`` as a float, or a :class:`ConfigError` saying which rule ``what`` breaks."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{what} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ConfigError(f"{what} must be > 0, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{what} must be >= {minimum}, got {value!r}")
    if below is not None and value >= below:
        raise ConfigError(f"{what} must be < {below}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Device:
    """One device (see the module docstring for the fields and their units).

    ``speed`` is None only for a device with its own profile: ``profile`` is the profile
    file's path and ``block_times`` its measured ``(block name, seconds)`` pairs. Use
    :meth:`relative_speed` (a whole model) or :meth:`time_factor` (one block range) rather than
    ``speed`` wherever a device may carry a profile.
    """

    name: str
    speed: float | None
    memory_mb: float
    bandwidth_mbps: float
    latency_ms: float
    failure_prob: float = 0.0
    profile: str | None = None
    block_times: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"device name must be a non-empty string, got {self.name!r}")
        where = f"device {self.name!r}"
        if self.speed is None and self.profile is None:
            raise ConfigError(f"{where}: give speed or profile")
        if self.speed is not None:
            finite_number(self.speed, f"{where} speed", positive=True)
        finite_number(self.memory_mb, f"{where} memory_mb", positive=True)
        finite_number(self.bandwidth_mbps, f"{where} bandwidth_mbps", positive=True)
        finite_number(self.latency_ms, f"{where} latency_ms", minimum=0.0)
        finite_number(self.failure_prob, f"{where} failure_prob", minimum=0.0, below=1.0)
        if (self.profile is None) != (not self.block_times):
            raise ConfigError(f"{where}: a profile needs its block times and vice versa")
        if self.block_times and math.fsum(t for _, t in self.block_times) <= 0:
            raise ConfigError(f"{where} profile {self.profile}: its block times add up to 0")

    @property
    def memory_bytes(self) -> float:
        return self.memory_mb * MIB

    def transfer_s(self, nbytes: float) -> float:
        """Time to send ``nbytes`` to the next device over this device's link."""
        return nbytes * 8.0 / (self.bandwidth_mbps * 1e6) + self.latency_ms / 1000.0

    def relative_speed(self, block_names: Sequence[str], block_times: Sequence[float]) -> float:
        """How many times faster than the reference machine this device runs the whole model
        whose blocks took ``block_times`` there: ``speed``, or with a profile the ratio of the
        two total times (the profile must be of the same blocks)."""
        if not self.block_times:
            return self._written_speed()
        own = [name for name, _ in self.block_times]
        if own != list(block_names):
            raise ConfigError(
                f"device {self.name!r}: its profile ({self.profile}) has blocks {own}, "
                f"the model has {list(block_names)}"
            )
        return math.fsum(block_times) / math.fsum(t for _, t in self.block_times)

    def time_factor(self, start: int, end: int, reference_s: float) -> float:
        """How many times longer blocks ``[start, end)`` take on this device than on the
        reference machine, where they take ``reference_s`` seconds."""
        if not self.block_times:
            return 1.0 / self._written_speed()
        if end > len(self.block_times):
            raise ConfigError(
                f"device {self.name!r}: its profile has {len(self.block_times)} blocks, "
                f"blocks [{start}, {end}) were asked for"
            )
        if reference_s <= 0:
            raise ConfigError(f"reference time of blocks [{start}, {end}) must be > 0")
        return math.fsum(t for _, t in self.block_times[start:end]) / reference_s

    def _written_speed(self) -> float:
        if self.speed is None:  # not reached: __post_init__ wants a speed or a profile
            raise ConfigError(f"device {self.name!r} has neither speed nor profile")
        return self.speed

    def describe(self) -> str:
        if self.profile is not None:
            return f"own profile {self.profile}"
        return f"speed x{self.speed:g} of the profiling machine"

    def to_dict(self) -> dict[str, Any]:
        """The device's table as a device file writes it."""
        out: dict[str, Any] = {"name": self.name}
        if self.speed is not None:
            out["speed"] = self.speed
        out |= {
            "memory_mb": self.memory_mb,
            "bandwidth_mbps": self.bandwidth_mbps,
            "latency_ms": self.latency_ms,
            "failure_prob": self.failure_prob,
        }
        if self.profile is not None:
            out["profile"] = self.profile
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], base_dir: Path | None = None) -> Device:
        """One ``[[device]]`` table (the module's rules; ``profile`` relative to
        ``base_dir``)."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"a device must be a table, got {data!r}")
        where = f"device {data.get('name', '?')!r}"
        unknown = sorted(set(data) - {*REQUIRED_KEYS, *OPTIONAL_KEYS})
        if unknown:
            raise ConfigError(
                f"{where}: unknown keys {unknown} (known: {[*REQUIRED_KEYS, *OPTIONAL_KEYS]})"
            )
        missing = [k for k in REQUIRED_KEYS if k not in data]
        if "speed" not in data and "profile" not in data:
            missing.append("speed (or profile)")
        if missing:
            raise ConfigError(f"{where}: missing keys {missing}")
        profile, block_times = _read_profile(data.get("profile"), where, base_dir)
        return cls(
            name=data["name"],
            speed=data.get("speed"),
            memory_mb=data["memory_mb"],
            bandwidth_mbps=data["bandwidth_mbps"],
            latency_ms=data["latency_ms"],
            failure_prob=data.get("failure_prob", 0.0),
            profile=profile,
            block_times=block_times,
        )


def _read_profile(
    path: Any, where: str, base_dir: Path | None
) -> tuple[str | None, tuple[tuple[str, float], ...]]:
    if path is None:
        return None, ()
    if not isinstance(path, str) or not path:
        raise ConfigError(f"{where}: profile must be a file name, got {path!r}")
    # the profile file format lives with the profiler (which imports torch): only a device
    # file that names a profile pays for that import
    from pipeline.profiling import load_profile

    full = Path(path) if Path(path).is_absolute() else (base_dir or Path()) / path
    prof = load_profile(full)
    return str(full), tuple((b.name, b.compute_s) for b in prof.blocks)


def devices_from_toml(
    text: str, source: str = "<string>", base_dir: Path | None = None
) -> tuple[Device, ...]:
    """The devices of a device file's text, in pipeline order; errors name ``source``."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
    unknown = sorted(set(doc) - {"device"})
    if unknown:
        raise ConfigError(f"{source}: unknown top-level keys {unknown} (expected [[device]])")
    tables = doc.get("device")
    if not isinstance(tables, list) or not tables:
        raise ConfigError(f"{source}: no [[device]] tables")
    devices = []
    for k, table in enumerate(tables):
        try:
            devices.append(Device.from_dict(table, base_dir))
        except ConfigError as exc:
            raise ConfigError(f"{source}: [[device]] #{k + 1}: {exc}") from exc
    check_unique_names(devices, source)
    return tuple(devices)


def load_devices(path: str | Path) -> tuple[Device, ...]:
    """The devices of a device file (profile paths relative to its folder)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read device file {p}: {exc}") from exc
    return devices_from_toml(text, source=str(p), base_dir=p.parent)


def check_unique_names(devices: Sequence[Device], source: str = "devices") -> None:
    """A device name is a node id: it may appear once."""
    names = [d.name for d in devices]
    if len(set(names)) != len(names):
        raise ConfigError(f"{source}: duplicate device names in {names}")
