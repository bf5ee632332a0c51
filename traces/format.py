"""The trace file format: one CSV row per image, times in seconds since the trace start.

A trace file looks like this::

    # edgeprune-trace: 1
    # name: orinoquia_day1
    # source: Orinoquía Camera Traps, 2020-01-08, via jennamk14/adae_model
    # t0: 2020-01-08T00:00:00
    # duration_s: 86400
    timestamp,camera,sequence
    30286,A05,39e8b482-7160-11ec-89cc-5cf3706028c2
    30287,A05,39e8b482-7160-11ec-89cc-5cf3706028c2

- Lines starting with ``#`` before the header row are the preamble: ``key: value`` pairs.
  ``edgeprune-trace`` (format version, 1), ``name``, ``source``, ``t0`` and ``duration_s`` are
  read into :class:`Trace` fields; any other key goes to ``Trace.metadata``. Comment lines and
  blank lines after the header are skipped.
- ``timestamp`` is the canonical time: seconds (a float, ``>= 0``) since ``t0``, the start of
  the observation window. ``t0`` is the camera's local wall-clock time as naive ISO-8601, so
  time of day is ``t0 + timestamp``. Relative seconds make replay and merging trivial; the
  absolute start is kept once, in the preamble.
- ``duration_s`` is the length of the observation window (defaults to the last arrival's time).
  Trailing silence matters for per-minute statistics and rates, so converters set it.
- The header row starts with ``timestamp,camera``; ``sequence``, ``species`` and ``label`` may
  follow in any order. Unknown or repeated columns are rejected, so a misspelt column is an
  error rather than silently lost data. Empty optional cells mean "unknown".
- Rows need not be in time order: the loader sorts them (and logs that it did).
"""

from __future__ import annotations

import csv
import io
import logging
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from itertools import pairwise
from pathlib import Path

from pipeline.errors import TraceError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
REQUIRED_COLUMNS = ("timestamp", "camera")
OPTIONAL_COLUMNS = ("sequence", "species", "label")
DATA_DIR = Path(__file__).resolve().parent / "data"
_FIELD_KEYS = {"edgeprune-trace", "name", "source", "t0", "duration_s"}
_KEY_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")


@dataclass(frozen=True)
class Arrival:
    """One image arriving at a camera ``t`` seconds after the trace start."""

    t: float
    camera: str
    sequence: str | None = None
    species: str | None = None
    label: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.t, int | float) or not math.isfinite(self.t) or self.t < 0:
            raise TraceError(f"arrival time must be a finite number >= 0, got {self.t!r}")
        if not isinstance(self.camera, str) or not self.camera.strip():
            raise TraceError("arrival has no camera")
        for name in ("camera", "sequence", "species"):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, str) or not value or value != value.strip():
                raise TraceError(
                    f"{name} {value!r} must be a non-empty string without "
                    "surrounding spaces (or None)"
                )
            if "\n" in value or "\r" in value:
                raise TraceError(f"{name} {value!r} contains a line break")
        if self.label is not None and (
            isinstance(self.label, bool) or not isinstance(self.label, int) or self.label < 0
        ):
            raise TraceError(f"label must be an int >= 0, got {self.label!r}")


def _arrival_key(a: Arrival) -> tuple[float, str]:
    return (a.t, a.camera)


@dataclass(frozen=True)
class Trace:
    """Arrivals sorted by time, with where they came from.

    ``t0`` is the wall-clock start of the observation window (naive local time, or None when
    unknown); ``duration_s`` its length, at least the last arrival's time (None means "ends at
    the last arrival"). ``metadata`` holds free-form string pairs from the file preamble.
    """

    arrivals: tuple[Arrival, ...]
    name: str
    source: str = ""
    t0: datetime | None = None
    duration_s: float | None = None
    metadata: Mapping[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        arrivals = tuple(self.arrivals)
        if any(_arrival_key(a) > _arrival_key(b) for a, b in pairwise(arrivals)):
            arrivals = tuple(sorted(arrivals, key=_arrival_key))
        object.__setattr__(self, "arrivals", arrivals)
        object.__setattr__(self, "metadata", dict(self.metadata))
        if not self.name or "\n" in self.name:
            raise TraceError(f"bad trace name {self.name!r}")
        if self.duration_s is not None:
            if not math.isfinite(self.duration_s) or self.duration_s < 0:
                raise TraceError(f"duration_s must be a finite number >= 0, got {self.duration_s}")
            if arrivals and arrivals[-1].t > self.duration_s:
                raise TraceError(
                    f"an arrival at t={arrivals[-1].t} lies after the trace end "
                    f"(duration_s={self.duration_s})"
                )
        for key, value in self.metadata.items():
            if not _KEY_RE.match(key) or key in _FIELD_KEYS or "\n" in value or "\r" in value:
                raise TraceError(f"bad metadata entry {key!r}: {value!r}")

    def __len__(self) -> int:
        return len(self.arrivals)

    @property
    def span_s(self) -> float:
        """The observation window length: ``duration_s``, or the last arrival's time."""
        if self.duration_s is not None:
            return self.duration_s
        return self.arrivals[-1].t if self.arrivals else 0.0

    @property
    def clock_offset_s(self) -> float:
        """Seconds from local midnight to ``t0`` (0 when ``t0`` is unknown): the local time of
        day of an arrival is ``(clock_offset_s + t) % 86400``."""
        if self.t0 is None:
            return 0.0
        midnight = self.t0.replace(hour=0, minute=0, second=0, microsecond=0)
        return (self.t0 - midnight).total_seconds()

    @property
    def cameras(self) -> tuple[str, ...]:
        """Camera names, sorted."""
        return tuple(sorted({a.camera for a in self.arrivals}))

    def times(self) -> list[float]:
        """Arrival times in seconds since the start, sorted."""
        return [a.t for a in self.arrivals]


# ---------------------------------------------------------------- reading


def _parse_preamble_line(
    text: str, line: int, fields: dict[str, str], metadata: dict[str, str]
) -> None:
    body = text.lstrip("#").strip()
    if not body:
        return
    key, sep, value = body.partition(":")
    key, value = key.strip(), value.strip()
    if not sep or not _KEY_RE.match(key):
        return  # free-text comment
    if key in fields or key in metadata:
        raise TraceError(f"preamble key {key!r} given twice", line)
    (fields if key in _FIELD_KEYS else metadata)[key] = value


def _parse_header(cells: list[str], line: int) -> list[str]:
    columns = [c.strip() for c in cells]
    if tuple(columns[:2]) != REQUIRED_COLUMNS:
        raise TraceError(
            f"header must start with 'timestamp,camera', got {','.join(columns)!r}", line
        )
    seen: set[str] = set()
    for name in columns[2:]:
        if name not in OPTIONAL_COLUMNS:
            raise TraceError(
                f"unknown column {name!r} (optional columns: {', '.join(OPTIONAL_COLUMNS)})", line
            )
        if name in seen:
            raise TraceError(f"column {name!r} appears twice", line)
        seen.add(name)
    return columns


def _parse_row(cells: list[str], columns: list[str], line: int) -> Arrival:
    if len(cells) != len(columns):
        raise TraceError(
            f"expected {len(columns)} fields ({','.join(columns)}), got {len(cells)}", line
        )
    row = dict(zip(columns, (c.strip() for c in cells), strict=True))
    raw_t = row["timestamp"]
    try:
        t = float(raw_t)
    except ValueError:
        raise TraceError(
            f"bad timestamp {raw_t!r}: expected seconds since t0 as a number", line
        ) from None
    if not math.isfinite(t) or t < 0:
        raise TraceError(f"bad timestamp {raw_t!r}: must be finite and >= 0", line)
    if not row["camera"]:
        raise TraceError("missing camera", line)
    label: int | None = None
    if row.get("label"):
        try:
            label = int(row["label"])
        except ValueError:
            raise TraceError(f"label {row['label']!r} is not an integer class id", line) from None
        if label < 0:
            raise TraceError(f"label {label} is negative", line)
    return Arrival(t, row["camera"], row.get("sequence") or None, row.get("species") or None, label)


def _float_field(fields: dict[str, str], key: str, lines: dict[str, int]) -> float | None:
    if key not in fields:
        return None
    try:
        value = float(fields[key])
    except ValueError:
        raise TraceError(f"bad {key} {fields[key]!r}: expected a number", lines[key]) from None
    if not math.isfinite(value) or value < 0:
        raise TraceError(f"bad {key} {fields[key]!r}: must be finite and >= 0", lines[key])
    return value


def parse_trace(text: str, name: str, origin: str = "<string>") -> Trace:
    """Parse trace text (see the module docstring); ``name`` is used when the file has none."""
    fields: dict[str, str] = {}
    metadata: dict[str, str] = {}
    field_lines: dict[str, int] = {}
    columns: list[str] | None = None
    arrivals: list[Arrival] = []
    last_t, last_line = -math.inf, 0
    first_unsorted: int | None = None
    # split on "\n" only: str.splitlines() would also break on characters such as U+2028
    for line, raw in enumerate(text.split("\n"), start=1):
        raw = raw.removesuffix("\r")
        stripped = raw.strip()
        if columns is None and stripped.startswith("#"):
            before = set(fields)
            _parse_preamble_line(stripped, line, fields, metadata)
            for key in set(fields) - before:
                field_lines[key] = line
            continue
        if not stripped or stripped.startswith("#"):
            continue
        cells = next(csv.reader([raw]))
        if columns is None:
            columns = _parse_header(cells, line)
            continue
        arrival = _parse_row(cells, columns, line)
        if arrival.t < last_t and first_unsorted is None:
            first_unsorted = line
        if arrival.t >= last_t:
            last_t, last_line = arrival.t, line
        arrivals.append(arrival)
    if columns is None:
        raise TraceError(f"{origin}: no header row (expected 'timestamp,camera,...')")
    version = fields.get("edgeprune-trace", str(FORMAT_VERSION))
    if version != str(FORMAT_VERSION):
        raise TraceError(
            f"unsupported trace format version {version!r} (this is {FORMAT_VERSION})",
            field_lines.get("edgeprune-trace"),
        )
    t0: datetime | None = None
    if "t0" in fields:
        try:
            t0 = datetime.fromisoformat(fields["t0"])
        except ValueError:
            raise TraceError(
                f"bad t0 {fields['t0']!r}: expected ISO-8601 local time", field_lines["t0"]
            ) from None
        if t0.tzinfo is not None:
            raise TraceError(
                "t0 must be naive local wall-clock time (no UTC offset)", field_lines["t0"]
            )
    duration = _float_field(fields, "duration_s", field_lines)
    if duration is not None and arrivals and last_t > duration:
        raise TraceError(
            f"arrival at t={last_t:g} lies after the trace end (duration_s="
            f"{duration:g} on line {field_lines['duration_s']})",
            last_line,
        )
    if first_unsorted is not None:
        log.info(
            "%s: rows are not in time order (first at line %d); sorted them", origin, first_unsorted
        )
    return Trace(
        tuple(arrivals),
        fields.get("name") or name,
        fields.get("source", ""),
        t0,
        duration,
        metadata,
    )


def load_trace(path: str | Path) -> Trace:
    """Read a trace file. Raises :class:`TraceError` (with the line number) on a bad row."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise TraceError(f"cannot read trace {path}: {exc}") from exc
    try:
        trace = parse_trace(text, path.stem, str(path))
    except TraceError as exc:
        if str(path) in exc.reason:
            raise
        raise TraceError(f"{exc.reason} (in {path})", exc.line) from exc
    log.debug("loaded %s: %d arrivals, %d cameras", path, len(trace), len(trace.cameras))
    return trace


# ---------------------------------------------------------------- writing


def format_seconds(t: float) -> str:
    """Seconds with microsecond precision and no trailing zeros ("30286", "12.5")."""
    text = f"{t:.6f}".rstrip("0").rstrip(".")
    return text or "0"


def format_trace(trace: Trace) -> str:
    """The text of ``trace`` as a trace file; :func:`parse_trace` reads it back unchanged."""
    out = io.StringIO()
    out.write(f"# edgeprune-trace: {FORMAT_VERSION}\n# name: {trace.name}\n")
    if trace.source:
        out.write(f"# source: {' '.join(trace.source.split())}\n")
    if trace.t0 is not None:
        out.write(f"# t0: {trace.t0.isoformat()}\n")
    if trace.duration_s is not None:
        out.write(f"# duration_s: {format_seconds(trace.duration_s)}\n")
    for key, value in trace.metadata.items():
        out.write(f"# {key}: {' '.join(value.split())}\n")
    used = [c for c in OPTIONAL_COLUMNS if any(getattr(a, c) is not None for a in trace.arrivals)]
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*REQUIRED_COLUMNS, *used])
    for a in trace.arrivals:
        extra = ["" if getattr(a, c) is None else str(getattr(a, c)) for c in used]
        writer.writerow([format_seconds(a.t), a.camera, *extra])
    return out.getvalue()


def save_trace(trace: Trace, path: str | Path) -> Path:
    """Write ``trace`` to ``path`` (parent folders are created). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(format_trace(trace), encoding="utf-8")
    log.debug("wrote %s: %d arrivals", path, len(trace))
    return path


# ---------------------------------------------------------------- shipped traces


def available_traces() -> list[str]:
    """Names of the traces shipped in ``traces/data``."""
    return sorted(p.stem for p in DATA_DIR.glob("*.csv"))


def default_trace_path(name: str) -> Path:
    """The path of the shipped trace ``name`` (e.g. ``"dsail_porini"``)."""
    path = DATA_DIR / f"{name}.csv"
    if "/" in name or "\\" in name or not path.is_file():
        raise TraceError(
            f"no shipped trace named {name!r} (available: "
            f"{', '.join(available_traces()) or 'none'})"
        )
    return path


def resolve_trace(path_or_name: str | Path) -> Path:
    """An existing file path as is, otherwise the shipped trace of that name."""
    path = Path(path_or_name)
    if path.is_file():
        return path
    if path.suffix or len(path.parts) > 1:
        raise TraceError(f"no such trace file: {path}")
    return default_trace_path(str(path_or_name))


def load_traces(items: Iterable[str | Path]) -> list[Trace]:
    """Load several traces given as paths or shipped names."""
    return [load_trace(resolve_trace(item)) for item in items]
