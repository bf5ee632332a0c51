"""bus.messages: every message kind round-trips through its dataclass (property-based), and a
bad field of any kind is refused with the one error of a bad message, CodecError."""

from __future__ import annotations

import itertools
import json
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bus import messages as m
from pipeline import codec
from pipeline.errors import CodecError
from pipeline.placement import Placement, SliceBounds
from tests.helpers import GOOD

names = st.from_regex(r"[A-Za-z0-9_.\-]{1,64}", fullmatch=True)  # node names are topic levels
texts = st.text(max_size=80)
times = st.floats(min_value=0, max_value=4e9, allow_nan=False)
seconds = st.floats(min_value=0, max_value=1e6, allow_nan=False)
small = st.integers(min_value=0, max_value=1000)
levels = st.lists(st.integers(min_value=0, max_value=20), max_size=8).map(tuple)
maybe_bool = st.none() | st.booleans()


def _opt(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.none() | strategy


hops = st.builds(codec.Hop, small, names, seconds, seconds, small)
bounds = st.tuples(small, st.integers(min_value=1, max_value=100)).map(
    lambda t: (t[0], t[0] + t[1])
)

results = st.builds(
    m.ResultMessage,
    request_id=names,
    camera=names,
    label=texts,
    label_index=small,
    score=st.floats(min_value=0, max_value=1),
    true_label=_opt(small),
    correct=maybe_bool,
    levels=st.lists(_opt(small), max_size=8).map(tuple),
    entry_ts=times,
    attempt=small,
    views=_opt(levels),
    missing=_opt(levels),
    fused_on=_opt(texts),
    waited_s=_opt(seconds),
)
exits = st.builds(
    m.ExitMessage,
    request_id=names,
    camera=names,
    capture_ts=times,
    entry_ts=times,
    exit_ts=times,
    latency_s=st.floats(min_value=-1e3, max_value=1e6, allow_nan=False),
    stages=st.lists(hops, max_size=6).map(tuple),
    attempt=small,
    correct=maybe_bool,
)
level_messages = st.builds(
    m.LevelMessage,
    stage=small,
    level=small,
    ratio=st.floats(min_value=0, max_value=0.999),
    seq=_opt(small),
    reason=texts,
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | seconds | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(names, inner, max_size=3),
    max_leaves=8,
)


@st.composite
def decisions(draw: st.DrawFn) -> m.DecisionMessage:
    before = draw(levels)
    after = tuple(draw(small) for _ in before)
    changed = tuple(i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b)
    details = draw(
        st.dictionaries(
            names.filter(lambda k: k not in {*m.DecisionMessage.TYPED, "v", "kind"}),
            json_values,
            max_size=4,
        )
    )
    return m.DecisionMessage(
        seq=draw(small),
        at=draw(seconds),
        ts=draw(_opt(times)),
        policy=draw(texts),
        objective=draw(texts),
        action=draw(texts),
        reason=draw(texts),
        how=draw(texts),
        levels_before=before,
        levels=after,
        changed=changed,
        feasible=draw(st.booleans()),
        details=details,
    )


statuses = st.builds(
    m.StatusMessage,
    node=names,
    state=st.sampled_from(m.NODE_STATES),
    ts=times,
    reason=texts,
    stage=_opt(small),
    bounds=_opt(bounds),
)
metrics = st.builds(
    m.MetricsMessage,
    node=names,
    ts=times,
    stage=_opt(small),
    bounds=_opt(bounds),
    level=_opt(small),
    ratio=_opt(st.floats(min_value=0, max_value=1)),
    queue_depth=small,
    service_s=_opt(seconds),
    compute_s=_opt(seconds),
    received=small,
    processed=small,
    errors=small,
    shed=small,
    level_changes=small,
    plan_version=st.integers(min_value=-1, max_value=1000),
    emulated_factor=st.floats(min_value=0.01, max_value=100),
    emulation=texts,
    uptime_s=seconds,
)
errors = st.builds(
    m.ErrorMessage,
    node=names,
    topic=texts,
    reason=texts,
    ts=times,
    stage=_opt(small),
    request_id=_opt(names),
    size=small,
    shed=st.booleans(),
)


@st.composite
def plans(draw: st.DrawFn) -> m.PlanMessage:
    widths = draw(st.lists(st.integers(min_value=1, max_value=5), min_size=1, max_size=6))
    edges = np.cumsum([0, *widths]).tolist()
    nodes = draw(st.lists(names, min_size=len(widths), max_size=len(widths), unique=True))
    return m.PlanMessage(
        draw(small),
        Placement.build([SliceBounds(a, b) for a, b in itertools.pairwise(edges)], nodes),
        draw(texts),
    )


JSON_KINDS = {
    "result": results,
    "exit": exits,
    "level": level_messages,
    "plan": plans(),
    "decision": decisions(),
    "status": statuses,
    "metrics": metrics,
    "error": errors,
}


def test_the_catalogue_names_every_kind() -> None:
    assert set(m.CATALOGUE) == {"stage", *JSON_KINDS}


@pytest.mark.parametrize("kind", sorted(JSON_KINDS))
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_json_kind_round_trips(kind: str, data: st.DataObject) -> None:
    message = data.draw(JSON_KINDS[kind])
    cls = m.CATALOGUE[kind]
    payload = message.to_json()
    assert cls.from_json(payload) == message
    assert cls.from_json(payload.decode("utf-8")) == message
    assert m.decode_any(payload) == message
    obj = json.loads(payload)
    assert (obj["v"], obj["kind"]) == (codec.SCHEMA_VERSION, kind)


def _stage_fields(msg: codec.StageMessage) -> dict[str, Any]:
    out = {k: getattr(msg, k) for k in ("request_id", "camera", "stage", "entry_ts")}
    out.update(
        capture_ts=msg.capture_ts,
        label=msg.label,
        hops=msg.hops,
        attempt=msg.attempt,
        meta=dict(msg.meta),
        image=msg.image,
        image_format=msg.image_format,
        full_channels=msg.full_channels,
        tensor=None if msg.tensor is None else msg.tensor.tolist(),
        channels=None if msg.channels is None else msg.channels.tolist(),
    )
    return out


@st.composite
def stage_messages(draw: st.DrawFn) -> codec.StageMessage:
    common: dict[str, Any] = dict(
        request_id=draw(names),
        camera=draw(names),
        entry_ts=draw(times),
        capture_ts=draw(times),
        label=draw(_opt(small)),
        hops=tuple(draw(st.lists(hops, max_size=4))),
        attempt=draw(small),
        meta=draw(st.dictionaries(names, names | small, max_size=3)),
    )
    if draw(st.booleans()):
        return m.StageMessage(
            stage=0, image=draw(st.binary(min_size=1, max_size=64)), image_format="png", **common
        )
    full = draw(st.integers(min_value=1, max_value=8))
    kept = sorted(draw(st.sets(st.integers(0, full - 1), min_size=1, max_size=full)))
    values = draw(
        st.lists(st.floats(-1e3, 1e3, width=32), min_size=len(kept) * 4, max_size=len(kept) * 4)
    )
    return m.StageMessage(
        stage=draw(st.integers(1, 10)),
        tensor=np.asarray(values, dtype=np.float32).reshape(1, len(kept), 2, 2),
        channels=np.asarray(kept, dtype=np.int32),
        full_channels=full,
        **common,
    )


@settings(max_examples=60, deadline=None)
@given(message=stage_messages())
def test_stage_message_round_trips_through_the_codec(message: codec.StageMessage) -> None:
    back = m.decode_stage(m.encode_stage(message))
    assert _stage_fields(back) == _stage_fields(message)


# --------------------------------------------------------------------------- bad fields


# one bad field per kind: wrong type, out of range, missing
BAD_FIELDS: list[tuple[str, str, Any]] = [
    ("result", "score", "high"),
    ("result", "score", 1.5),
    ("result", "levels", None),
    ("exit", "latency_s", "slow"),
    ("exit", "stages", [{"stage": 0}]),
    ("exit", "request_id", None),
    ("level", "level", "3"),
    ("level", "level", -1),
    ("level", "ratio", 1.0),
    ("level", "level", None),
    ("plan", "stages", "n0"),
    ("plan", "num_blocks", 4),
    ("plan", "version", None),
    ("decision", "levels", [3]),
    ("decision", "feasible", "yes"),
    ("decision", "seq", None),
    ("status", "state", "sleepy"),
    ("status", "node", "a/b"),
    ("status", "bounds", [3, 0]),
    ("status", "ts", None),
    ("metrics", "queue_depth", "two"),
    ("metrics", "service_s", -1.0),
    ("metrics", "node", None),
    ("error", "shed", "no"),
    ("error", "bytes", -1),
    ("error", "reason", None),
]
MISSING = object()


def _payload(
    kind: str,
    field_name: str | None = None,
    value: Any = MISSING,
    head: dict[str, Any] | None = None,
) -> bytes:
    body = dict(GOOD[kind])
    if field_name is not None:
        if value is None:
            body.pop(field_name)  # None in the table means: leave the field out
        else:
            body[field_name] = value
    obj = {"v": codec.SCHEMA_VERSION, "kind": kind, **body, **(head or {})}
    return json.dumps(obj).encode()


@pytest.mark.parametrize("kind", sorted(GOOD))
def test_the_good_example_of_each_kind_decodes(kind: str) -> None:
    assert m.CATALOGUE[kind].from_json(_payload(kind)).to_json()


@pytest.mark.parametrize(("kind", "field_name", "value"), BAD_FIELDS)
def test_a_bad_field_is_a_codec_error(kind: str, field_name: str, value: Any) -> None:
    with pytest.raises(CodecError):
        m.CATALOGUE[kind].from_json(_payload(kind, field_name, value))


@pytest.mark.parametrize("kind", sorted(GOOD))
@pytest.mark.parametrize("head", [{"v": 2}, {"v": "1"}, {"kind": "other"}])
def test_a_wrong_schema_version_or_kind_is_a_codec_error(kind: str, head: dict[str, Any]) -> None:
    with pytest.raises(CodecError):
        m.CATALOGUE[kind].from_json(_payload(kind, head=head))


def test_every_kind_has_a_bad_field_case() -> None:
    assert {k for k, _, _ in BAD_FIELDS} == set(GOOD)


def test_decode_any_refuses_an_unknown_kind() -> None:
    with pytest.raises(CodecError, match="unknown"):
        m.decode_any(codec.encode_json("gossip", {}))


@pytest.mark.parametrize("kind", sorted(GOOD))
def test_decode_any_parses_a_payload_once_and_validates_it(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Readers of many topics (the recorder, tap, top) pay for one JSON parse per message."""
    parses = []
    decode_json = codec.decode_json

    def counting(*args: Any, **kwargs: Any) -> dict[str, Any]:
        parses.append(kind)
        return decode_json(*args, **kwargs)

    monkeypatch.setattr(codec, "decode_json", counting)
    message = m.decode_any(_payload(kind))
    assert isinstance(message, m.CATALOGUE[kind])
    if kind != "plan":  # the plan is decoded by its own module
        assert parses == [kind]
    bad_field, bad_value = next((f, v) for k, f, v in BAD_FIELDS if k == kind)
    with pytest.raises(CodecError):
        m.decode_any(_payload(kind, bad_field, bad_value))


def test_a_bad_result_keeps_its_request_id() -> None:
    with pytest.raises(CodecError) as info:
        m.ResultMessage.from_json(_payload("result", "score", 2.0))
    assert info.value.request_id == "r1"


def test_building_a_bad_message_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        m.LevelMessage(stage=0, level=-1, ratio=0.0)
    with pytest.raises(ValueError):
        m.StatusMessage(node="n0", state="sleepy", ts=0.0)  # type: ignore[arg-type]


def test_a_negative_latency_travels_but_is_no_latency_to_use() -> None:
    exit_ = m.ExitMessage("r1", "cam0", 2.0, 2.0, 1.5, -0.5, ())
    assert m.ExitMessage.from_json(exit_.to_json()) == exit_  # what the node measured
    assert m.ExitMessage("r1", "cam0", 2.0, 2.0, 2.5, 0.5, ()).causal_latency_s() == 0.5
    with pytest.raises(CodecError, match="clocks") as info:
        exit_.causal_latency_s()
    assert info.value.request_id == "r1"


def test_a_level_beyond_the_receivers_levels_is_a_codec_error() -> None:
    level = m.LevelMessage(stage=0, level=5, ratio=0.5)
    assert level.level_of(6) == 5
    with pytest.raises(CodecError, match="out of range"):
        level.level_of(5)


def test_the_experiment_recorder_keeps_only_valid_messages_in_their_one_shape() -> None:
    from bus.connection import MqttSettings
    from bus.observer import Recorder
    from bus.topics import Topics

    recorder = Recorder(MqttSettings(), "p")
    topic = Topics("p").status("n1")
    status = m.StatusMessage(node="n1", state="online", ts=1.0)
    recorder.on_message(topic, status.to_json(), 5.0)
    recorder.on_message(topic, _payload("status", "state", "sleepy"), 6.0)
    recorder.on_message(Topics("p").control_stage(0), _payload("level", "level", "high"), 7.0)
    assert recorder.bad == 2 and recorder.events["level"] == []
    [kept] = recorder.events["status"]
    assert kept["rx"] == 5.0 and m.StatusMessage.from_body(kept) == status
