"""The wire formats: msgpack stage messages, and JSON for the human-readable topics.

A stage message (topic ``edgeprune/<pipe>/stage/<i>``) is one msgpack map:

| key    | type                      | meaning                                                    |
| ------ | ------------------------- | ---------------------------------------------------------- |
| `v`    | int                       | schema version, ``SCHEMA_VERSION`` (1)                     |
| `kind` | str                       | ``"stage"``                                                |
| `id`   | str                       | request id (1 to 128 characters)                           |
| `cam`  | str                       | camera that captured the image                             |
| `st`   | int                       | stage that must process this message                       |
| `t0`   | float                     | epoch seconds the request entered the pipeline             |
| `tc`   | float                     | epoch seconds the image was captured                       |
| `att`  | int, optional (0)         | re-send counter (for de-duplication)                       |
| `y`    | int, optional (nil)       | true label, when known                                     |
| `hops` | array of maps             | per hop ``{s: stage, n: node, q: queue_s, c: compute_s, l: level}`` |
| `meta` | map, optional ({})        | small free-form, str -> str / int / float                  |
| `ch`   | tensor, optional (nil)    | kept output channel indices, int32, 1-D; nil = all present |
| `full` | int, optional (nil)       | full channel width to scatter back into                    |
| `img`  | map, stage 0 only         | ``{fmt: "png"/"jpeg"/"raw", shape: [h, w] or [h, w, c] (raw uint8 only), data: bin}`` |
| `x`    | tensor, stage >= 1 only   | the activations                                            |

A *tensor* is ``{dtype: str, shape: [int, ...], data: bin}``, plus ``as: "float32"`` when a
float32 tensor travels as float16. ``data`` is the raw little-endian C-order bytes; never
pickle. ``dtype`` is one of ``WIRE_DTYPES`` (float32, float16, uint8, int8, int32, int64: the
float types carry activations, the integer types quantised activations and indices; nothing
else has a use here). Shapes have rank 1 to ``MAX_RANK`` and no zero dimension. A float tensor
must hold finite values only: NaN or infinity is refused at intake (it would poison every
score downstream).

Unknown keys are ignored, so adding an optional key keeps version 1; anything else bumps it.
The payload (``img`` or ``x``) is written last, so encoding copies the tensor bytes once.

JSON messages (results, exits, control, status, metrics, errors) are compact UTF-8 objects
with ``"v"`` and ``"kind"`` first; see :func:`encode_json` and :func:`decode_json`.

Constructing a bad :class:`StageMessage` or :class:`Hop` raises ``TypeError``/``ValueError``
(a programming error); decoding bad bytes raises only :class:`~pipeline.errors.CodecError`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import msgpack
import numpy as np

from pipeline.errors import CodecError

SCHEMA_VERSION = 1
MAX_PACKET_BYTES = 16 * 1024 * 1024
"""The broker's ``max_packet_size`` (``edgeprune broker``, ``broker/*.conf``): 16 MiB, room for
a several-MB activation tensor. The broker disconnects a client that sends a bigger packet."""
PACKET_HEADROOM_BYTES = 64 * 1024
"""Room for what an MQTT packet carries besides its payload (fixed header, topic, properties)."""
DEFAULT_MAX_BYTES = MAX_PACKET_BYTES - PACKET_HEADROOM_BYTES
"""The largest stage message a node accepts by default: below the broker's packet limit, so a
message too big for the node still reaches it and is reported on ``errors``."""
DEFAULT_MAX_JSON_BYTES = 65536
MAX_RANK = 6
MAX_NAME = 128  # characters in a request id, camera, node name or meta key/value
MAX_HOPS = 64
MAX_META = 32
IMAGE_FORMATS = frozenset({"png", "jpeg", "raw"})
WIRE_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(name).newbyteorder("<")
    for name in ("float32", "float16", "uint8", "int8", "int32", "int64")
}
_INT32_MAX = 2**31 - 1
_SALVAGE_BYTES = 512  # how much of a broken message is read to recover its request id

_set = object.__setattr__  # assigns normalised values in the __post_init__ of frozen classes


@dataclass(frozen=True)
class Hop:
    """The timings of one stage: seconds queued and computing on ``node`` at pruning ``level``."""

    stage: int
    node: str
    queue_s: float
    compute_s: float
    level: int

    def __post_init__(self) -> None:
        _set(self, "stage", check_int(self.stage, "hop stage"))
        _set(self, "node", check_text(self.node, "hop node"))
        _set(self, "queue_s", check_float(self.queue_s, "hop queue_s", non_negative=True))
        _set(self, "compute_s", check_float(self.compute_s, "hop compute_s", non_negative=True))
        _set(self, "level", check_int(self.level, "hop level"))


@dataclass(frozen=True, eq=False)
class StageMessage:
    """One request on its way through the pipeline, addressed to stage ``stage``.

    The payload is either ``image`` (stage 0: encoded PNG/JPEG bytes, or raw uint8 pixels of
    ``image_shape``) or ``tensor`` (stage >= 1). ``channels`` lists which output channels of
    the full width ``full_channels`` a pruned slice sent (None: all of them).
    ``transport_dtype`` is set by :func:`decode_stage` to the dtype the tensor travelled as
    (``"float16"`` means the values were rounded to float16); :func:`encode_stage` ignores it.
    Equality is identity (the arrays have no useful ``==``).
    """

    request_id: str
    camera: str
    stage: int
    entry_ts: float
    capture_ts: float
    label: int | None = None
    hops: tuple[Hop, ...] = ()
    image: bytes | None = None
    image_format: str | None = None
    image_shape: tuple[int, ...] | None = None
    tensor: np.ndarray | None = None
    channels: np.ndarray | None = None
    full_channels: int | None = None
    attempt: int = 0
    meta: Mapping[str, str | int | float] = field(default_factory=dict)
    transport_dtype: str | None = None

    def __post_init__(self) -> None:
        _set(self, "request_id", check_text(self.request_id, "request_id"))
        _set(self, "camera", check_text(self.camera, "camera"))
        _set(self, "stage", check_int(self.stage, "stage"))
        _set(self, "entry_ts", check_float(self.entry_ts, "entry_ts"))
        _set(self, "capture_ts", check_float(self.capture_ts, "capture_ts"))
        if self.label is not None:
            _set(self, "label", check_int(self.label, "label"))
        _set(self, "attempt", check_int(self.attempt, "attempt"))
        hops = tuple(self.hops)
        if len(hops) > MAX_HOPS or not all(isinstance(h, Hop) for h in hops):
            raise TypeError(f"hops must be at most {MAX_HOPS} Hop values")
        _set(self, "hops", hops)
        _set(self, "meta", MappingProxyType(_meta(self.meta)))
        if self.transport_dtype is not None and self.transport_dtype not in WIRE_DTYPES:
            raise ValueError(f"transport_dtype must be one of {sorted(WIRE_DTYPES)}")
        if (self.image is None) == (self.tensor is None):
            raise ValueError("exactly one of image and tensor must be given")
        if (self.image is not None) != (self.stage == 0):
            raise ValueError("stage 0 carries an image; later stages carry a tensor")
        if self.image is not None:
            self._check_image()
        else:
            self._check_tensor()

    def _check_image(self) -> None:
        if not isinstance(self.image, bytes | bytearray | memoryview):
            raise TypeError(f"image must be bytes, got {type(self.image).__name__}")
        _set(self, "image", bytes(self.image))
        if not self.image:
            raise ValueError("image is empty")
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(f"image_format must be one of {sorted(IMAGE_FORMATS)}")
        if self.image_format == "raw":
            shape = _shape(self.image_shape, "image_shape", ranks=(2, 3))
            if math.prod(shape) != len(self.image):
                raise ValueError(
                    f"raw image of shape {shape} needs {math.prod(shape)} bytes, "
                    f"got {len(self.image)}"
                )
            _set(self, "image_shape", shape)
        elif self.image_shape is not None:
            raise ValueError("image_shape is only for raw images")
        if self.channels is not None or self.full_channels is not None:
            raise ValueError("an image has no channels/full_channels")

    def _check_tensor(self) -> None:
        x = self.tensor
        if not isinstance(x, np.ndarray):
            raise TypeError(f"tensor must be a numpy array, got {type(x).__name__}")
        if x.dtype.name not in WIRE_DTYPES:
            raise ValueError(f"tensor dtype {x.dtype.name} is not one of {sorted(WIRE_DTYPES)}")
        _shape(x.shape, "tensor shape")
        if x.dtype.kind == "f" and not np.isfinite(x).all():
            raise ValueError("tensor has non-finite values (NaN or infinity)")
        if self.image_format is not None or self.image_shape is not None:
            raise ValueError("a tensor message has no image_format/image_shape")
        full = self.full_channels
        if full is not None:
            full = check_int(full, "full_channels", lo=1, hi=_INT32_MAX)
            _set(self, "full_channels", full)
        if self.channels is None:
            if full is not None and (x.ndim < 2 or x.shape[1] != full):
                raise ValueError(f"tensor of shape {x.shape} does not have {full} channels")
            return
        ch = self.channels
        if not isinstance(ch, np.ndarray) or ch.dtype.kind not in "iu" or ch.ndim != 1:
            raise TypeError("channels must be a 1-D integer numpy array")
        if full is None:
            raise ValueError("channels needs full_channels")
        if x.ndim < 2 or x.shape[1] != len(ch):
            raise ValueError(f"{len(ch)} channel indices for a tensor of shape {x.shape}")
        if len(ch) and (ch.min() < 0 or ch.max() >= full):
            raise ValueError(f"channel indices must lie in [0, {full})")
        if len(np.unique(ch)) != len(ch):
            raise ValueError("channel indices must be unique")
        _set(self, "channels", ch.astype(np.int32, copy=False))


def encode_stage(msg: StageMessage, *, float16: bool = False) -> bytes:
    """The msgpack bytes of ``msg``. With ``float16``, a float32 tensor travels as float16
    (half the bytes) and decodes back to float32; a tensor with values beyond float16's range
    (+-65504), which would become infinite, travels as float32."""
    head: dict[str, Any] = {
        "v": SCHEMA_VERSION,
        "kind": "stage",
        "id": msg.request_id,
        "cam": msg.camera,
        "st": msg.stage,
        "t0": msg.entry_ts,
        "tc": msg.capture_ts,
        "att": msg.attempt,
        "hops": [
            {"s": h.stage, "n": h.node, "q": h.queue_s, "c": h.compute_s, "l": h.level}
            for h in msg.hops
        ],
    }
    if msg.label is not None:
        head["y"] = msg.label
    if msg.meta:
        head["meta"] = dict(msg.meta)
    if msg.channels is not None:
        ch = np.ascontiguousarray(msg.channels, dtype=WIRE_DTYPES["int32"])
        head["ch"] = {"dtype": "int32", "shape": [len(ch)], "data": ch.tobytes()}
    if msg.full_channels is not None:
        head["full"] = msg.full_channels
    if msg.image is not None:
        body: dict[str, Any] = {"fmt": msg.image_format}
        if msg.image_shape is not None:
            body["shape"] = list(msg.image_shape)
        return _pack_with_payload(head, "img", body, memoryview(msg.image))
    x = msg.tensor
    if x is None:  # cannot happen after __post_init__; narrows the type
        raise ValueError("a stage message needs an image or a tensor")
    body = {}
    if float16 and x.dtype.name == "float32":
        with np.errstate(over="ignore"):  # values beyond float16 are sent as float32 instead
            half = x.astype(WIRE_DTYPES["float16"])
        if np.isfinite(half).all():
            x = half
            body["as"] = "float32"
    x = np.ascontiguousarray(x, dtype=WIRE_DTYPES[x.dtype.name])  # no copy when already so
    body.update(dtype=x.dtype.name, shape=list(x.shape))
    return _pack_with_payload(head, "x", body, x.data.cast("B"))


def decode_stage(
    data: bytes | bytearray | memoryview, *, max_bytes: int = DEFAULT_MAX_BYTES
) -> StageMessage:
    """Decode and validate a stage message; raises only :class:`CodecError`.

    The tensor is ``np.frombuffer`` over the bytes msgpack made for the ``data`` field: no
    copy beyond the one msgpack makes, and it does not keep ``data`` alive. It is therefore
    READ-ONLY (copy it, or use ``torch.tensor``, before writing to it). A float16-transported
    tensor is converted to a fresh, writable float32 array.
    """
    buf = _buffer(data, max_bytes)
    n = buf.nbytes  # no container can hold more items than there are bytes
    try:
        obj = msgpack.unpackb(
            buf,
            raw=False,
            strict_map_key=True,
            max_bin_len=n,
            max_str_len=n,
            max_ext_len=n,
            max_array_len=n,
            max_map_len=n // 2,
        )
    except Exception as exc:  # msgpack documents that unpackb may raise any Exception
        reason = str(exc) or type(exc).__name__
        raise CodecError(f"malformed msgpack: {reason}", _salvage_request_id(buf)) from exc
    if not isinstance(obj, dict):
        raise CodecError(f"a stage message is a map, got {type(obj).__name__}")
    rid = obj.get("id")
    request_id = rid if isinstance(rid, str) and 0 < len(rid) <= MAX_NAME else None
    try:
        _check_header(obj, "stage")
        return _message_from_wire(obj)
    except (TypeError, ValueError, OverflowError) as exc:
        raise CodecError(str(exc), request_id) from exc


def encode_json(kind: str, body: Mapping[str, Any]) -> bytes:
    """Compact UTF-8 JSON of ``{"v": SCHEMA_VERSION, "kind": kind, **body}``.

    numpy scalars and arrays are converted; NaN and infinity are refused (``ValueError``)."""
    if not isinstance(kind, str) or not kind:
        raise ValueError("kind must be a non-empty string")
    if "v" in body or "kind" in body:
        raise ValueError("body must not contain 'v' or 'kind'")
    obj = {"v": SCHEMA_VERSION, "kind": kind, **body}
    return json.dumps(
        obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_json_default
    ).encode("utf-8")


def decode_json(
    data: bytes | bytearray | memoryview | str,
    *,
    expect_kind: str | None = None,
    max_bytes: int = DEFAULT_MAX_JSON_BYTES,
) -> dict[str, Any]:
    """The object of a JSON message (bytes, or the text of them), ``v`` and ``kind``
    included; raises only CodecError."""
    buf = _buffer(data.encode("utf-8") if isinstance(data, str) else data, max_bytes)
    try:
        obj = json.loads(str(buf, "utf-8"), parse_constant=_finite_float, parse_float=_finite_float)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise CodecError(f"malformed JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise CodecError(f"a JSON message is an object, got {type(obj).__name__}")
    rid = obj.get("request_id")
    try:
        _check_header(obj, expect_kind)
    except ValueError as exc:
        raise CodecError(str(exc), rid if isinstance(rid, str) else None) from exc
    return obj


# --- decoding helpers (raise TypeError/ValueError; the public functions translate) ---------


def _buffer(data: object, max_bytes: int) -> memoryview:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise CodecError(f"expected bytes, got {type(data).__name__}")
    buf = memoryview(data)
    if not buf.c_contiguous:
        raise CodecError("expected a contiguous buffer")
    if buf.nbytes > max_bytes:
        raise CodecError(
            f"message of {buf.nbytes} bytes exceeds the limit of {max_bytes}",
            _salvage_request_id(buf.cast("B")),
        )
    return buf.cast("B") if buf.format != "B" or buf.ndim != 1 else buf


def _salvage_request_id(buf: memoryview) -> str | None:
    """Best effort: the ``id`` of a message that cannot be decoded, from its first bytes."""
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=_SALVAGE_BYTES)
    try:
        unpacker.feed(bytes(buf[:_SALVAGE_BYTES]))
        for _ in range(min(unpacker.read_map_header(), 8)):
            if unpacker.unpack() == "id":
                rid = unpacker.unpack()
                return rid if isinstance(rid, str) and 0 < len(rid) <= MAX_NAME else None
            unpacker.skip()
    except Exception:  # any failure just means the id cannot be read
        return None
    return None


def _check_header(obj: dict[str, Any], kind: str | None) -> None:
    if "v" not in obj:
        raise ValueError("missing schema version 'v'")
    v = obj["v"]
    if type(v) is not int:
        raise ValueError(f"schema version must be an int, got {_short(v)}")
    if v != SCHEMA_VERSION:
        raise ValueError(f"unsupported schema version {v} (this build reads {SCHEMA_VERSION})")
    if not isinstance(obj.get("kind"), str):
        raise ValueError("missing or non-string 'kind'")
    if kind is not None and obj["kind"] != kind:
        raise ValueError(f"expected kind {kind!r}, got {_short(obj['kind'])}")


def _message_from_wire(obj: dict[str, Any]) -> StageMessage:
    hops = _get(obj, "hops", list)
    if len(hops) > MAX_HOPS:
        raise ValueError(f"more than {MAX_HOPS} hops")
    if not all(isinstance(h, dict) for h in hops):
        raise TypeError("each hop must be a map")
    fields: dict[str, Any] = {
        "request_id": _get(obj, "id", str),
        "camera": _get(obj, "cam", str),
        "stage": obj.get("st"),
        "entry_ts": obj.get("t0"),
        "capture_ts": obj.get("tc"),
        "label": obj.get("y"),
        "attempt": obj.get("att", 0),
        "meta": obj.get("meta", {}),
        "hops": tuple(
            Hop(h.get("s"), h.get("n"), h.get("q"), h.get("c"), h.get("l")) for h in hops
        ),
        "full_channels": obj.get("full"),
    }
    if obj.get("ch") is not None:
        fields["channels"] = _array(obj["ch"], "channels", dtypes=("int32",), ranks=(1,))
    if ("img" in obj) == ("x" in obj):
        raise ValueError("exactly one of 'img' and 'x' must be present")
    if "img" in obj:
        img = _get(obj, "img", dict)
        shape = img.get("shape")
        fields.update(
            image=_get(img, "data", bytes),
            image_format=img.get("fmt"),
            image_shape=tuple(shape) if isinstance(shape, list) else shape,
        )
        return StageMessage(**fields)
    x = _get(obj, "x", dict)
    tensor = _array(x, "tensor", dtypes=tuple(WIRE_DTYPES))
    fields["transport_dtype"] = tensor.dtype.name
    if "as" in x:
        if x["as"] != "float32" or tensor.dtype.name != "float16":
            raise ValueError(
                f"'as' widens float16 to float32 only, got {tensor.dtype.name} as {_short(x['as'])}"
            )
        tensor = tensor.astype(np.float32)
    return StageMessage(tensor=tensor, **fields)


def _array(
    m: object,
    what: str,
    *,
    dtypes: tuple[str, ...],
    ranks: tuple[int, ...] = tuple(range(1, MAX_RANK + 1)),
) -> np.ndarray:
    if not isinstance(m, dict):
        raise TypeError(f"{what} must be a map")
    name = m.get("dtype")
    if not isinstance(name, str) or name not in dtypes:
        raise ValueError(f"{what}: dtype {_short(name)} is not one of {list(dtypes)}")
    shape = _shape(m.get("shape"), f"{what} shape", ranks=ranks)
    data = _get(m, "data", bytes)
    dtype = WIRE_DTYPES[name]
    if math.prod(shape) * dtype.itemsize != len(data):
        raise ValueError(
            f"{what}: shape {list(shape)} of {name} needs "
            f"{math.prod(shape) * dtype.itemsize} bytes, got {len(data)}"
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def _get(obj: dict[str, Any], key: str, kind: type) -> Any:
    if key not in obj:
        raise ValueError(f"missing field {key!r}")
    if not isinstance(obj[key], kind):
        raise TypeError(f"field {key!r} must be {kind.__name__}, got {type(obj[key]).__name__}")
    return obj[key]


# --- value checks shared by construction and decoding -------------------------------------


# The field checks of every message (the stage message here, the JSON kinds in bus/messages.py):
# TypeError / ValueError naming the field; the decoders turn them into CodecError.


def check_int(value: object, what: str, *, lo: int = 0, hi: int = _INT32_MAX) -> int:
    if type(value) is int and lo <= value <= hi:  # the common case, on every message's path
        return value
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{what} must be an int, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise ValueError(f"{what} must lie in [{lo}, {hi}], got {value}")
    return int(value)


def check_float(value: object, what: str, *, non_negative: bool = False) -> float:
    if type(value) is float and math.isfinite(value) and (value >= 0 or not non_negative):
        return value  # the common case, on every message's path
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise TypeError(f"{what} must be a number, got {type(value).__name__}")
    out = float(value)
    if not math.isfinite(out) or (non_negative and out < 0):
        raise ValueError(f"{what} must be finite{' and >= 0' if non_negative else ''}, got {out}")
    return out


def check_text(value: object, what: str, *, min_len: int = 1) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, got {type(value).__name__}")
    if not min_len <= len(value) <= MAX_NAME:
        raise ValueError(f"{what} must have {min_len} to {MAX_NAME} characters")
    return value


def _shape(
    value: object, what: str, *, ranks: tuple[int, ...] = tuple(range(1, MAX_RANK + 1))
) -> tuple[int, ...]:
    if not isinstance(value, tuple | list) or len(value) not in ranks:
        raise ValueError(f"{what} must be a list of {ranks[0]} to {ranks[-1]} ints")
    return tuple(check_int(d, what, lo=1) for d in value)


def _meta(value: object) -> dict[str, str | int | float]:
    if not isinstance(value, Mapping) or len(value) > MAX_META:
        raise TypeError(f"meta must be a map of at most {MAX_META} entries")
    out: dict[str, str | int | float] = {}
    for key, item in value.items():
        check_text(key, "meta key")
        if isinstance(item, str):
            out[key] = check_text(item, f"meta[{key!r}]", min_len=0)
        elif isinstance(item, float):
            out[key] = check_float(item, f"meta[{key!r}]")
        else:
            out[key] = check_int(item, f"meta[{key!r}]", lo=-(2**63), hi=2**63 - 1)
    return out


def _pack_with_payload(
    head: dict[str, Any], key: str, body: dict[str, Any], data: memoryview
) -> bytes:
    """``packb({**head, key: {**body, "data": data}})``, but with ``data`` copied only once:
    it is written last behind a bin32 header and joined, instead of going through msgpack's
    buffer and then into a new bytes object."""
    pk = msgpack.Packer()
    parts = [pk.pack_map_header(len(head) + 1)]
    for k, v in head.items():
        parts += [pk.pack(k), pk.pack(v)]
    parts += [pk.pack(key), pk.pack_map_header(len(body) + 1)]
    for k, v in body.items():
        parts += [pk.pack(k), pk.pack(v)]
    if data.nbytes > 2**32 - 1:
        raise ValueError("payload larger than 4 GiB")
    parts += [pk.pack("data"), b"\xc6" + data.nbytes.to_bytes(4, "big"), data]
    return b"".join(parts)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic | np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _finite_float(text: str) -> float:
    """Refuses NaN, Infinity and numbers beyond float range (which json makes inf)."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number out of range: {text[:20]}")
    return value
