"""What ``edgeprune tap`` prints: one summary per MQTT message of a pipeline, never raising.

:func:`describe` turns (topic, payload) into a :class:`TapRecord`: binary stage messages are
decoded with :func:`pipeline.codec.decode_stage` and summarised (request id, camera, stage,
hops so far, and the tensor's dtype, shape, kept channels and bytes, or the image's format
and bytes); JSON topics are decoded with :func:`pipeline.codec.decode_json`. A payload that
does not decode becomes an ``invalid`` record carrying the codec's reason, and an empty
payload (a retained message being cleared) an ``empty`` one.

:func:`format_line` renders a record as one human-readable line, :func:`json_line` as one
compact JSON object (for ``--json``).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from bus.topics import ROOT
from pipeline import codec
from pipeline.errors import CodecError

MAX_TAP_BYTES = 256 * 1024 * 1024  # decode whatever the broker let through


@dataclass(frozen=True)
class TapRecord:
    """One observed message.

    ``kind`` is the message kind (``stage``, ``result``, ``exit``, ``level``, ``plan``,
    ``decision``, ``status``, ``metrics``, ``error``, ...), or ``invalid`` / ``empty``.
    ``body`` is the summary of a stage message or the JSON object without ``v`` and
    ``kind``; for ``invalid`` it holds ``reason`` and, when readable, ``request_id``.
    """

    ts: float  # epoch seconds the tap received it
    topic: str
    size: int  # payload bytes
    kind: str
    body: dict[str, Any] = field(default_factory=dict)
    retained: bool = False
    version: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "ts": round(self.ts, 6),
            "topic": self.topic,
            "bytes": self.size,
            "retained": self.retained,
            "kind": self.kind,
            "v": self.version,
            "body": self.body,
        }


def is_stage_topic(topic: str) -> bool:
    """``edgeprune/<pipe>/stage/<i>`` and ``stage/0/<camera>``: the binary msgpack topics."""
    parts = topic.split("/")
    return len(parts) in (4, 5) and parts[0] == ROOT and parts[2] == "stage"


def describe(
    topic: str,
    payload: bytes | bytearray | memoryview,
    *,
    retained: bool = False,
    ts: float | None = None,
) -> TapRecord:
    """Decode one message into a record; bad payloads become ``invalid`` records."""
    now = time.time() if ts is None else ts
    size = memoryview(payload).nbytes
    if size == 0:
        return TapRecord(now, topic, 0, "empty", {}, retained)
    try:
        if is_stage_topic(topic):
            msg = codec.decode_stage(payload, max_bytes=MAX_TAP_BYTES)
            return TapRecord(
                now, topic, size, "stage", summarize_stage(msg, now), retained, codec.SCHEMA_VERSION
            )
        obj = codec.decode_json(payload, max_bytes=MAX_TAP_BYTES)
    except CodecError as exc:
        body: dict[str, Any] = {"reason": exc.reason}
        if exc.request_id is not None:
            body["request_id"] = exc.request_id
        return TapRecord(now, topic, size, "invalid", body, retained)
    version = obj.pop("v")
    kind = obj.pop("kind")
    return TapRecord(now, topic, size, str(kind), obj, retained, version)


def summarize_stage(msg: codec.StageMessage, now: float) -> dict[str, Any]:
    """The fields of a decoded stage message worth a look (no payload bytes)."""
    out: dict[str, Any] = {
        "request_id": msg.request_id,
        "camera": msg.camera,
        "stage": msg.stage,
        "attempt": msg.attempt,
        "label": msg.label,
        "entry_ts": msg.entry_ts,
        "capture_ts": msg.capture_ts,
        "age_s": now - msg.entry_ts,
        "hops": [
            {
                "stage": h.stage,
                "node": h.node,
                "queue_s": h.queue_s,
                "compute_s": h.compute_s,
                "level": h.level,
            }
            for h in msg.hops
        ],
    }
    if msg.meta:
        out["meta"] = dict(msg.meta)
    if msg.image is not None:
        out["image"] = {
            "format": msg.image_format,
            "bytes": len(msg.image),
            "shape": list(msg.image_shape) if msg.image_shape else None,
        }
        return out
    x = msg.tensor
    if x is None:  # cannot happen for a decoded message; narrows the type
        return out
    wire = msg.transport_dtype or x.dtype.name
    full = (
        msg.full_channels
        if msg.full_channels is not None
        else (x.shape[1] if x.ndim >= 2 else None)
    )
    kept = len(msg.channels) if msg.channels is not None else full
    out["tensor"] = {
        "dtype": x.dtype.name,
        "wire_dtype": wire,
        "shape": list(x.shape),
        "channels": kept,
        "full_channels": full,
        "bytes": math.prod(x.shape) * codec.WIRE_DTYPES[wire].itemsize,
    }
    return out


# --- rendering ------------------------------------------------------------------------------


def short_topic(topic: str) -> str:
    """The topic without ``edgeprune/<pipe>/`` (the pipe is in the tap's header line)."""
    parts = topic.split("/", 2)
    return parts[2] if len(parts) == 3 and parts[0] == ROOT else topic


def format_line(rec: TapRecord) -> str:
    """One human-readable line: time, topic, kind, size, then the interesting fields."""
    clock = datetime.fromtimestamp(rec.ts).strftime("%H:%M:%S.%f")[:-3]
    head = f"{clock} {short_topic(rec.topic):<22} {rec.kind:<8} {_size(rec.size):>7}"
    if rec.retained:
        head += " (retained)"
    if rec.kind == "stage":
        return f"{head}  {_stage_text(rec.body)}"
    if rec.kind == "invalid":
        rid = rec.body.get("request_id")
        return f"{head}  {'id=' + rid + ' ' if rid else ''}undecodable: {rec.body['reason']}"
    if rec.kind == "empty":
        return f"{head}  (empty payload: retained message cleared)"
    return f"{head}  {_pairs(rec.body)}"


def json_line(rec: TapRecord) -> str:
    """One compact JSON object per message (``--json``)."""
    return json.dumps(rec.to_dict(), separators=(",", ":"), ensure_ascii=False, default=_default)


def _stage_text(b: dict[str, Any]) -> str:
    parts = [f"id={b['request_id']}", f"cam={b['camera']}", f"st={b['stage']}"]
    if b["attempt"]:
        parts.append(f"att={b['attempt']}")
    if b["label"] is not None:
        parts.append(f"y={b['label']}")
    hops = " ".join(
        f"{h['stage']}:{h['node']}@L{h['level']}({_ms(h['queue_s'])}+{_ms(h['compute_s'])})"
        for h in b["hops"]
    )
    parts.append(f"hops=[{hops}]")
    if "image" in b:
        img = b["image"]
        shape = "x".join(map(str, img["shape"])) + " " if img["shape"] else ""
        parts.append(f"image={img['format']} {shape}{_size(img['bytes'])}")
    elif "tensor" in b:
        t = b["tensor"]
        dtype = t["dtype"] if t["wire_dtype"] == t["dtype"] else f"{t['dtype']}<-{t['wire_dtype']}"
        parts.append(
            f"x={dtype}[{','.join(map(str, t['shape']))}] "
            f"ch={t['channels']}/{t['full_channels']} {_size(t['bytes'])}"
        )
    parts.append(f"age={_ms(b['age_s'])}")
    return " ".join(parts)


def _pairs(body: dict[str, Any]) -> str:
    return " ".join(f"{k}={_compact(v)}" for k, v in body.items())


def _compact(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}" if abs(value) < 1e6 else f"{value:.3f}"  # keep epoch ts precise
    if isinstance(value, str):
        return value if value and " " not in value and "=" not in value else json.dumps(value)
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_compact(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_compact(v) for v in value) + "]"
    return json.dumps(value)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}ms"


def _size(n: int) -> str:
    if n < 1024:
        return f"{n}B"
    if n < 1024 * 1024:
        return f"{n / 1024:.1f}KB"
    return f"{n / (1024 * 1024):.1f}MB"


def _default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
