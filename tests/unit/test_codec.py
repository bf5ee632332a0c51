"""The msgpack stage codec and the JSON helpers: round trips, and bad input of every kind
raising only CodecError."""

from __future__ import annotations

import contextlib
import copy
import json
import math
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pipeline import codec
from pipeline.codec import (
    SCHEMA_VERSION,
    WIRE_DTYPES,
    Hop,
    StageMessage,
    decode_json,
    decode_stage,
    encode_json,
    encode_stage,
)
from pipeline.errors import CodecError

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

HOPS = (Hop(0, "pi-a", 0.002, 0.031, 0), Hop(1, "pi-b", 0.0, 0.012, 3))


def tensor_message(tensor: np.ndarray, **kw: Any) -> StageMessage:
    fields: dict[str, Any] = dict(
        request_id="req-1",
        camera="cam-7",
        stage=2,
        entry_ts=1_700_000_000.25,
        capture_ts=1_700_000_000.0,
        label=4,
        hops=HOPS,
        attempt=1,
        meta={"site": "A", "n": 3},
    )
    fields.update(kw)
    return StageMessage(tensor=tensor, **fields)


def pruned_message() -> StageMessage:
    x = np.arange(2 * 4 * 3 * 3, dtype=np.float32).reshape(2, 4, 3, 3)
    return tensor_message(x, channels=np.array([1, 3, 6, 7], dtype=np.int32), full_channels=8)


def wire(msg: StageMessage) -> dict[str, Any]:
    return msgpack.unpackb(encode_stage(msg), raw=False)


def decode_or_codec_error(data: bytes) -> StageMessage | None:
    """Decoding either succeeds or raises CodecError; anything else fails the test."""
    try:
        return decode_stage(data)
    except CodecError as exc:
        assert isinstance(exc.reason, str) and exc.reason
        return None


# --- round trips ---------------------------------------------------------------------------

shapes = hnp.array_shapes(min_dims=1, max_dims=codec.MAX_RANK, min_side=1, max_side=5)


def _wire_arrays(name: str) -> st.SearchStrategy[np.ndarray]:
    """Arrays of a wire dtype; float ones finite (NaN and infinity are refused)."""
    dtype = np.dtype(name)
    if dtype.kind != "f":
        return hnp.arrays(dtype, shapes)
    finite = st.floats(allow_nan=False, allow_infinity=False, width=8 * dtype.itemsize)
    return hnp.arrays(dtype, shapes, elements=finite)


@FAST
@given(st.sampled_from(sorted(WIRE_DTYPES)).flatmap(_wire_arrays))
def test_tensor_round_trip_is_bit_exact(x: np.ndarray) -> None:
    out = decode_stage(encode_stage(tensor_message(x)))
    assert out.tensor is not None
    assert out.tensor.dtype == x.dtype and out.tensor.shape == x.shape
    assert out.tensor.tobytes() == x.tobytes()  # bit-exact
    assert out.transport_dtype == x.dtype.name
    assert not out.tensor.flags.writeable
    assert (out.request_id, out.camera, out.stage, out.label, out.attempt) == (
        "req-1",
        "cam-7",
        2,
        4,
        1,
    )
    assert (out.entry_ts, out.capture_ts) == (1_700_000_000.25, 1_700_000_000.0)
    assert out.hops == HOPS and dict(out.meta) == {"site": "A", "n": 3}
    assert out.channels is None and out.full_channels is None


@FAST
@given(hnp.arrays(np.float32, shapes, elements=st.floats(-60000, 60000, width=32)))
def test_float16_transport_decodes_to_float32_within_tolerance(x: np.ndarray) -> None:
    data = encode_stage(tensor_message(x), float16=True)
    out = decode_stage(data)
    assert out.tensor is not None and out.tensor.dtype == np.float32
    assert out.transport_dtype == "float16"
    np.testing.assert_array_equal(out.tensor, x.astype(np.float16).astype(np.float32))
    np.testing.assert_allclose(out.tensor, x, rtol=2**-11, atol=2**-24)
    assert len(data) < len(encode_stage(tensor_message(x))) or x.size < 8


def test_float16_flag_leaves_other_dtypes_alone() -> None:
    x = np.arange(12, dtype=np.uint8).reshape(3, 4)
    out = decode_stage(encode_stage(tensor_message(x), float16=True))
    assert out.tensor is not None and out.tensor.dtype == np.uint8
    assert out.transport_dtype == "uint8"


@FAST
@given(st.data())
def test_channel_indices_round_trip(data: st.DataObject) -> None:
    full = data.draw(st.integers(1, 64))
    kept = data.draw(st.integers(1, full))
    channels = np.array(data.draw(st.permutations(range(full)))[:kept])
    dtype = data.draw(st.sampled_from([np.int32, np.int64, np.uint16]))
    x = np.ones((2, kept, 3), dtype=np.float32)
    out = decode_stage(
        encode_stage(tensor_message(x, channels=channels.astype(dtype), full_channels=full))
    )
    assert out.channels is not None and out.channels.dtype == np.int32
    np.testing.assert_array_equal(out.channels, channels)
    assert out.full_channels == full


def test_full_width_without_channels_round_trips() -> None:
    out = decode_stage(encode_stage(tensor_message(np.zeros((1, 8), np.float32), full_channels=8)))
    assert out.channels is None and out.full_channels == 8


@FAST
@given(fmt=st.sampled_from(["png", "jpeg"]), blob=st.binary(min_size=1, max_size=3000))
def test_encoded_image_round_trip(fmt: str, blob: bytes) -> None:
    msg = StageMessage("img-1", "cam-1", 0, 10.0, 9.5, image=blob, image_format=fmt)
    out = decode_stage(encode_stage(msg))
    assert (out.image, out.image_format, out.image_shape, out.tensor) == (blob, fmt, None, None)


@FAST
@given(shape=hnp.array_shapes(min_dims=2, max_dims=3, max_side=16), seed=st.integers(0, 99))
def test_raw_image_round_trip(shape: tuple[int, ...], seed: int) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    msg = StageMessage(
        "img-2",
        "cam-1",
        0,
        10.0,
        9.5,
        image=pixels.tobytes(),
        image_format="raw",
        image_shape=shape,
    )
    out = decode_stage(memoryview(encode_stage(msg)))
    assert out.image_shape == shape
    assert out.image is not None
    np.testing.assert_array_equal(np.frombuffer(out.image, np.uint8).reshape(shape), pixels)


def test_accepts_bytearray_and_memoryview_and_tolerates_unknown_keys() -> None:
    msg = pruned_message()
    data = encode_stage(msg)
    for form in (bytearray(data), memoryview(data)):
        assert decode_stage(form).request_id == "req-1"
    obj = wire(msg)
    obj["future_field"] = [1, 2, 3]
    assert decode_stage(msgpack.packb(obj)).full_channels == 8


def test_non_contiguous_float_tensor_is_encoded_in_c_order() -> None:
    x = np.arange(24, dtype=np.float32).reshape(4, 6)[:, ::2].T
    out = decode_stage(encode_stage(tensor_message(x)))
    assert out.tensor is not None
    np.testing.assert_array_equal(out.tensor, x)


def test_big_endian_tensor_travels_little_endian() -> None:
    x = np.arange(6, dtype=">f4").reshape(2, 3)
    assert wire(tensor_message(x))["x"]["data"] == x.astype("<f4").tobytes()
    out = decode_stage(encode_stage(tensor_message(x)))
    assert out.tensor is not None
    np.testing.assert_array_equal(out.tensor, x)


# --- construction validates ----------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        dict(tensor=np.zeros(3, np.float64)),  # dtype not on the whitelist
        dict(tensor=np.zeros((1,) * 7, np.float32)),  # rank 7
        dict(tensor=np.zeros((2, 0), np.float32)),  # zero dimension
        dict(tensor=np.zeros((1, 2), np.float32), channels=np.array([0, 0]), full_channels=4),
        dict(tensor=np.zeros((1, 2), np.float32), channels=np.array([0, 4]), full_channels=4),
        dict(tensor=np.zeros((1, 2), np.float32), channels=np.array([0, 1])),
        dict(tensor=np.zeros((1, 3), np.float32), channels=np.array([0, 1]), full_channels=4),
        dict(tensor=np.zeros(3, np.float32), entry_ts=math.nan),
        dict(tensor=np.zeros(3, np.float32), request_id=""),
        dict(tensor=np.zeros(3, np.float32), stage=True),
        dict(tensor=np.zeros(3, np.float32), stage=0),  # stage 0 carries an image
        dict(tensor=np.zeros(3, np.float32), meta={"k": [1]}),
        dict(tensor=np.zeros(3, np.float32), image=b"x", image_format="png"),
    ],
)
def test_construction_rejects_bad_fields(kw: dict[str, Any]) -> None:
    with pytest.raises((TypeError, ValueError)):
        tensor_message(**kw)


def test_construction_rejects_bad_images() -> None:
    base: dict[str, Any] = dict(request_id="r", camera="c", stage=0, entry_ts=0.0, capture_ts=0.0)
    for kw in (
        dict(image=b"abc", image_format="gif"),
        dict(image=b"abc", image_format="raw", image_shape=(2, 2)),
        dict(image=b"abcd", image_format="png", image_shape=(2, 2)),
        dict(image=b"", image_format="png"),
    ):
        with pytest.raises((TypeError, ValueError)):
            StageMessage(**base, **kw)


# --- bad bytes raise only CodecError -------------------------------------------------------


@FUZZ
@given(st.binary(max_size=600))
def test_random_bytes_raise_only_codec_error(data: bytes) -> None:
    decode_or_codec_error(data)


VALID = [
    encode_stage(pruned_message()),
    encode_stage(pruned_message(), float16=True),
    encode_stage(
        StageMessage(
            "img-9",
            "c",
            0,
            1.0,
            1.0,
            image=bytes(range(12)),
            image_format="raw",
            image_shape=(3, 4),
        )
    ),
]


@FUZZ
@given(base=st.sampled_from(VALID), data=st.data())
def test_mutated_bytes_raise_only_codec_error(base: bytes, data: st.DataObject) -> None:
    buf = bytearray(base)
    for _ in range(data.draw(st.integers(1, 4))):
        action = data.draw(st.sampled_from(["flip", "truncate", "insert", "set"]))
        i = data.draw(st.integers(0, max(len(buf) - 1, 0)))
        if action == "flip" and buf:
            buf[i] ^= 1 << data.draw(st.integers(0, 7))
        elif action == "truncate":
            del buf[i:]
        elif action == "insert":
            buf[i:i] = data.draw(st.binary(min_size=1, max_size=8))
        elif buf:
            buf[i] = data.draw(st.integers(0, 255))
    decode_or_codec_error(bytes(buf))


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    items = (
        obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    )
    for key, value in items:
        out += _paths(value, (*prefix, key))
    return out


junk = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=12)
    | st.binary(max_size=40)
    | st.sampled_from(
        [
            SCHEMA_VERSION + 1,
            "float64",
            "object",
            "<f4",
            "V8",
            "raw",
            "stage",
            [2**40, 2**40],
            [0],
            [-1],
            [1] * 7,
            [2**31],
            np.int32(5).tobytes(),
        ]
    ),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=8,
)


@FUZZ
@given(base=st.sampled_from(VALID), data=st.data())
def test_mutated_fields_raise_only_codec_error(base: bytes, data: st.DataObject) -> None:
    obj = msgpack.unpackb(base, raw=False)
    for _ in range(data.draw(st.integers(1, 3))):
        paths = _paths(obj)
        if not paths:
            break
        *parents, last = data.draw(st.sampled_from(paths))
        holder = obj
        for key in parents:
            holder = holder[key]
        if isinstance(holder, dict) and data.draw(st.booleans()):
            del holder[last]
        else:
            holder[last] = copy.deepcopy(data.draw(junk))  # sampled lists are shared
    decode_or_codec_error(msgpack.packb(obj, use_bin_type=True))


def _mutated(change: Any) -> bytes:
    obj = copy.deepcopy(wire(pruned_message()))
    change(obj)
    return msgpack.packb(obj)


def _set(path: tuple[str, ...], value: Any) -> Any:
    def change(obj: dict[str, Any]) -> None:
        for key in path[:-1]:
            obj = obj[key]
        obj[path[-1]] = value

    return change


def _drop(key: str) -> Any:
    return lambda obj: obj.pop(key)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (_set(("v",), 2), "version 2"),
        (_set(("v",), "1"), "version"),
        (_set(("v",), True), "version"),
        (_drop("v"), "version"),
        (_set(("kind",), "results"), "kind"),
        (_set(("st",), "2"), "stage"),
        (_set(("st",), -1), "stage"),
        (_set(("t0",), math.inf), "entry_ts"),
        (_set(("hops",), [{"s": 0}]), "hop"),
        (_set(("hops",), "none"), "hops"),
        (_set(("meta",), {"k": {"nested": 1}}), "meta"),
        (_set(("x", "dtype"), "float64"), "dtype"),
        (_set(("x", "dtype"), "object"), "dtype"),
        (_set(("x", "shape"), [2**40, 2**40, 2**40, 2**40]), "shape"),
        (_set(("x", "shape"), [2**30, 2**30, 2**30, 2**30]), "bytes"),
        (_set(("x", "shape"), [2, 4, 3, 4]), "bytes"),
        (_set(("x", "shape"), [1] * 7), "shape"),
        (_set(("x", "shape"), [-2, -4, 3, 3]), "shape"),
        (_set(("x", "shape"), [2.0, 4, 3, 3]), "shape"),
        (_set(("x", "data"), b"\0" * 7), "bytes"),
        (_set(("x", "data"), "text"), "data"),
        (_set(("x", "as"), "float64"), "float32"),
        (_set(("x", "as"), "float32"), "float16"),  # "as" on a float32 tensor
        (_drop("x"), "'x'"),
        (_set(("img",), {"fmt": "png", "data": b"x"}), "'x'"),  # both payloads
        (_set(("ch", "data"), np.array([1, 1, 6, 7], np.int32).tobytes()), "unique"),
        (_set(("ch", "data"), np.array([1, 3, 6, 8], np.int32).tobytes()), "channel"),
        (_set(("ch", "data"), np.array([-1, 3, 6, 7], np.int32).tobytes()), "channel"),
        (_set(("ch", "dtype"), "int64"), "dtype"),
        (_set(("ch", "shape"), [3]), "bytes"),
        (_set(("full",), None), "full_channels"),
        (_set(("full",), 2**40), "full_channels"),
    ],
)
def test_each_bad_field_is_a_codec_error_with_the_request_id(change: Any, words: str) -> None:
    with pytest.raises(CodecError) as info:
        decode_stage(_mutated(change))
    assert words in info.value.reason
    assert info.value.request_id == "req-1"


def test_unknown_version_is_named_even_without_other_fields() -> None:
    with pytest.raises(CodecError, match="version 7"):
        decode_stage(msgpack.packb({"v": 7}))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",
        b"\x93\x01\x02\x03",
        b"\x91" * 100_000,  # empty, reserved, array, deep
        b"\xdd\xff\xff\xff\xff",
        b"\xdf\xff\xff\xff\xff",  # lying array/map headers
        b"\xc6\xff\xff\xff\xff",
        b"\xdb\xff\xff\xff\xff",  # lying bin/str headers
        b"\xd6\xff\x00\x00\x00\x00",
        b"\xd7\xff\xff\xff\xff\xff\xff\xff\xff\xff",  # timestamps
        msgpack.packb({1: 2}, strict_types=False),
        msgpack.packb({"v": 1}) + b"\x00",
    ],
)
def test_malformed_msgpack_is_a_codec_error(data: bytes) -> None:
    with pytest.raises(CodecError):
        decode_stage(data)


@pytest.mark.parametrize(
    "data", ["text", None, 3, [1, 2], memoryview(bytes(16)).cast("B", (4, 4))[::2]]
)
def test_non_bytes_input_is_a_codec_error(data: Any) -> None:
    with pytest.raises(CodecError):
        decode_stage(data)


def test_oversized_payload_is_rejected_before_unpacking(monkeypatch: pytest.MonkeyPatch) -> None:
    data = encode_stage(tensor_message(np.zeros((4, 64, 16, 16), np.float32)))

    def fail(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("unpackb called on an oversized message")

    monkeypatch.setattr(codec.msgpack, "unpackb", fail)
    with pytest.raises(CodecError, match="exceeds") as info:
        decode_stage(data, max_bytes=len(data) - 1)
    assert info.value.request_id == "req-1"  # read from the first bytes only


@FAST
@given(cut=st.integers(60, len(VALID[0]) - 1))
def test_request_id_is_recovered_from_a_truncated_message(cut: int) -> None:
    with pytest.raises(CodecError) as info:
        decode_stage(VALID[0][:cut])
    assert info.value.request_id == "req-1"


def test_no_request_id_when_it_cannot_be_read() -> None:
    for data in (b"\xc1", msgpack.packb({"v": 2, "id": 5}), msgpack.packb([1, "req-1"])):
        with pytest.raises(CodecError) as info:
            decode_stage(data)
        assert info.value.request_id is None


# --- JSON helpers --------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@FAST
@given(
    kind=st.text(min_size=1, max_size=12),
    body=st.dictionaries(
        st.text(max_size=10).filter(lambda k: k not in ("v", "kind")), json_values, max_size=6
    ),
)
def test_json_round_trip(kind: str, body: dict[str, Any]) -> None:
    data = encode_json(kind, body)
    assert data.startswith(b'{"v":%d,"kind":' % SCHEMA_VERSION)
    compact = json.dumps(json.loads(data), separators=(",", ":"), ensure_ascii=False)
    assert data == compact.encode("utf-8")
    assert decode_json(data, expect_kind=kind) == {"v": SCHEMA_VERSION, "kind": kind, **body}


def test_encode_json_converts_numpy_and_refuses_nan_and_reserved_keys() -> None:
    out = decode_json(encode_json("m", {"a": np.float32(0.5), "b": np.arange(3)}))
    assert out == {"v": 1, "kind": "m", "a": 0.5, "b": [0, 1, 2]}
    for body in ({"x": math.nan}, {"v": 2}, {"kind": "other"}):
        with pytest.raises(ValueError):
            encode_json("m", body)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xff\xfe",
        b"not json",
        b"[1, 2]",
        b'"text"',
        b"{}",
        b'{"v": 1}',
        b'{"v": 2, "kind": "results"}',
        b'{"v": "1", "kind": "results"}',
        b'{"v": true, "kind": "results"}',
        b'{"v": 1, "kind": 5}',
        b'{"v": 1, "kind": "exits"}',
        b'{"v": 1, "kind": "results", "x": NaN}',
        b'{"v": 1, "kind": "results", "x": 1e999}',
        b"[" * 50_000,
        b'{"v": 1, "kind": "results", "pad": "' + b"x" * 70_000 + b'"}',
    ],
)
def test_decode_json_rejects_garbage(data: bytes) -> None:
    with pytest.raises(CodecError):
        decode_json(data, expect_kind="results")


def test_decode_json_reports_the_request_id() -> None:
    with pytest.raises(CodecError) as info:
        decode_json(b'{"v": 9, "kind": "results", "request_id": "abc"}')
    assert info.value.request_id == "abc"


@FUZZ
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_decode_json_raises_only_codec_error(data: bytes) -> None:
    with contextlib.suppress(CodecError):
        assert isinstance(decode_json(data), dict)


# ---- non-finite values, and the payload limits -------------------------------------------


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_non_finite_tensor_values_are_refused(value: float, dtype: str) -> None:
    x = np.ones((1, 4, 3, 3), dtype=dtype)
    x[0, 2, 1, 1] = value
    with pytest.raises(ValueError, match="non-finite"):
        tensor_message(x)
    obj = wire(tensor_message(np.ones((1, 4, 3, 3), dtype=dtype)))
    obj["x"]["data"] = x.tobytes()
    with pytest.raises(CodecError) as info:
        decode_stage(msgpack.packb(obj))
    assert "non-finite" in info.value.reason and info.value.request_id == "req-1"


def test_float16_transport_keeps_float32_for_values_beyond_float16() -> None:
    x = np.array([[1.5, -2.0, 1e5, 3e38]], dtype=np.float32)
    out = decode_stage(encode_stage(tensor_message(x), float16=True))
    assert out.transport_dtype == "float32"  # as float16 they would have become infinite
    np.testing.assert_array_equal(out.tensor, x)


def test_the_nodes_payload_limit_is_below_the_broker_packet_size_everywhere() -> None:
    from broker.launcher import BROKER_DIR, DEFAULT_MAX_PACKET_SIZE
    from nodes.config import NodeConfig

    assert DEFAULT_MAX_PACKET_SIZE == codec.MAX_PACKET_BYTES
    assert NodeConfig(node_id="n0").max_payload_bytes == codec.DEFAULT_MAX_BYTES
    assert codec.DEFAULT_MAX_BYTES < codec.MAX_PACKET_BYTES
    for conf in sorted(BROKER_DIR.glob("*.conf")):
        limits = [
            int(line.split()[1])
            for line in conf.read_text().splitlines()
            if line.startswith("max_packet_size ")
        ]
        assert limits == [codec.MAX_PACKET_BYTES], conf.name
