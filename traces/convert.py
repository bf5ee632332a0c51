"""Convert the raw camera-trap arrival files (``../shared/traces``) into trace files.

Two raw layouts are known:

- ``dsail``: ``timestamp,camera,species,animals`` (DSAIL-Porini, Raspberry Pi PIR cameras).
- ``orinoquia``: ``timestamp,camera,sequence,frame`` (Orinoquía Camera Traps, one day).

Raw timestamps are the camera's local time (ISO-8601, 1 s resolution). The converted trace
starts at local midnight of the first day (``t0``) and ends at midnight after the last day
(``duration_s``), so time of day is exact and the quiet hours before the first and after the
last image count as observed silence. Columns that the trace format does not carry
(``animals``, ``frame``) are dropped; ``frame`` is implied by the row order within a sequence.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path

from pipeline.errors import TraceError
from traces.format import Arrival, Trace

log = logging.getLogger(__name__)

KINDS: dict[str, dict[str, str]] = {
    "dsail": {
        "name": "dsail_porini",
        "columns": "timestamp,camera,species,animals",
        "source": "DSAIL-Porini camera-trap dataset (Mugambi et al., 2022; Mendeley Data "
        "6mhrhn7rxc): Raspberry Pi PIR camera traps in a Kenyan conservancy, "
        "June-November 2021; timestamps from the image file names of the public "
        "annotation sheet",
        "licence": "as stated on the Mendeley Data record 6mhrhn7rxc (cite Mugambi et al., 2022)",
    },
    "orinoquia": {
        "name": "orinoquia_day1",
        "columns": "timestamp,camera,sequence,frame",
        "source": "Orinoquía Camera Traps (Vélez et al., 2023; LILA BC), day 2020-01-08, "
        "10 commercial trail cameras, as extracted in github.com/jennamk14/adae_model",
        "licence": "dataset: Community Data License Agreement, permissive variant (LILA BC); "
        "extraction: MIT (jennamk14/adae_model)",
    },
}


def species_label(species: str | None, classes: Sequence[str] | None) -> int | None:
    """The index of ``species`` in ``classes``, or None (unknown, several species, no list)."""
    if species is None or not classes:
        return None
    try:
        return [c.strip().lower() for c in classes].index(species.strip().lower())
    except ValueError:
        return None


def convert_raw(
    src: str | Path, kind: str, *, name: str | None = None, classes: Sequence[str] | None = None
) -> Trace:
    """Read a raw arrival file of ``kind`` ("dsail" or "orinoquia") into a :class:`Trace`.

    ``classes`` (e.g. a model's class names) turns species names found in it into ``label``
    ids; other species keep only their name.
    """
    if kind not in KINDS:
        raise TraceError(f"unknown raw trace kind {kind!r} (known: {', '.join(KINDS)})")
    spec = KINDS[kind]
    src = Path(src)
    try:
        data = src.read_bytes()
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TraceError(f"cannot read raw trace {src}: {exc}") from exc
    rows = list(csv.reader([line.removesuffix("\r") for line in text.split("\n")]))
    expected = spec["columns"].split(",")
    if not rows or [c.strip() for c in rows[0]] != expected:
        raise TraceError(f"{src} is not a {kind} file: expected header {spec['columns']!r}", 1)
    stamps: list[tuple[datetime, list[str], int]] = []
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != len(expected):
            raise TraceError(f"expected {len(expected)} fields, got {len(row)}", line)
        try:
            when = datetime.fromisoformat(row[0].strip())
        except ValueError:
            raise TraceError(f"bad timestamp {row[0]!r}: expected ISO-8601", line) from None
        if when.tzinfo is not None:
            raise TraceError("timestamps must be local time without a UTC offset", line)
        if not row[1].strip():
            raise TraceError("missing camera", line)
        stamps.append((when, row, line))
    if not stamps:
        raise TraceError(f"{src} has no rows")
    first = min(s[0] for s in stamps)
    last = max(s[0] for s in stamps)
    t0 = datetime.combine(first.date(), datetime.min.time())
    end = datetime.combine(last.date(), datetime.min.time()) + timedelta(days=1)
    arrivals = []
    for when, row, _line in stamps:
        t = (when - t0).total_seconds()
        camera = row[1].strip()
        if kind == "dsail":
            species = row[2].strip() or None
            arrivals.append(Arrival(t, camera, None, species, species_label(species, classes)))
        else:
            arrivals.append(Arrival(t, camera, row[2].strip() or None))
    trace = Trace(
        tuple(arrivals),
        name or spec["name"],
        spec["source"],
        t0,
        (end - t0).total_seconds(),
        {
            "licence": spec["licence"],
            "converted_from": src.name,
            "raw_sha256": hashlib.sha256(data).hexdigest(),
            "converter": f"traces.convert.convert_raw(kind={kind})",
        },
    )
    log.info(
        "converted %s (%s): %d images, %d cameras, %s to %s",
        src,
        kind,
        len(trace),
        len(trace.cameras),
        first.isoformat(),
        last.isoformat(),
    )
    return trace
