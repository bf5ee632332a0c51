"""Every message kind that travels on the bus, one frozen dataclass each (docs/topics.md).

| kind       | class              | topic                          | wire                        |
| ---------- | ------------------ | ------------------------------ | --------------------------- |
| `stage`    | :class:`StageMessage` | `stage/0/<camera>`, `stage/<i>` | msgpack (:mod:`pipeline.codec`) |
| `result`   | :class:`ResultMessage`   | `results`                | JSON                        |
| `exit`     | :class:`ExitMessage`     | `exits`                  | JSON                        |
| `level`    | :class:`LevelMessage`    | `control/stage/<i>` (fusion: `control/view/<v>`) | JSON, retained |
| `plan`     | :class:`PlanMessage`     | `control/plan`           | JSON, retained (:mod:`bus.plan_message`) |
| `decision` | :class:`DecisionMessage` | `control/decisions`      | JSON                        |
| `status`   | :class:`StatusMessage`   | `nodes/<node>/status`    | JSON, retained (the Last Will) |
| `metrics`  | :class:`MetricsMessage`  | `nodes/<node>/metrics`   | JSON                        |
| `error`    | :class:`ErrorMessage`    | `errors`, `errors/<node>` | JSON                       |

Each JSON kind has ``to_json() -> bytes`` and ``from_json(bytes | str)``. The schema version
(``"v"``) and the kind are checked by :func:`pipeline.codec.decode_json`, the fields by the
class's ``__post_init__``: that is the one place a kind is validated, for what a service builds
and for what it reads. Building a bad message raises ``TypeError``/``ValueError`` (a programming
error); ``from_json`` of bad bytes raises only :class:`~pipeline.errors.CodecError`, the one
error of a bad message wherever it arrives (the stage message and the plan follow the same
rule).

A field with a default may be left out on the wire (it takes the default); every other field
is required. Unknown keys are ignored, so adding an optional field keeps version 1.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, ClassVar, Literal, Self

import numpy as np

from bus.plan_message import PlanMessage, StagePlacement
from bus.topics import check_name
from pipeline import codec
from pipeline.codec import Hop, StageMessage, decode_stage, encode_stage
from pipeline.errors import CodecError, ConfigError

__all__ = [
    "CATALOGUE",
    "DecisionMessage",
    "ErrorMessage",
    "ExitMessage",
    "Hop",
    "LevelMessage",
    "MetricsMessage",
    "NodeState",
    "PlanMessage",
    "ResultMessage",
    "StageMessage",
    "StagePlacement",
    "StatusMessage",
    "decode_any",
    "decode_stage",
    "encode_stage",
]

NodeState = Literal["online", "offline"]
NODE_STATES: tuple[NodeState, ...] = ("online", "offline")

_set = object.__setattr__  # normalises values in the __post_init__ of frozen classes
_INT64 = 2**63 - 1


class _JsonMessage:
    """``to_json``/``from_json`` of a JSON kind from its ``KIND``, ``body`` and ``from_body``."""

    KIND: ClassVar[str]

    def body(self) -> dict[str, Any]:
        """The message's fields as they go on the wire (without ``v`` and ``kind``)."""
        raise NotImplementedError

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Self:
        """The message of a decoded JSON object; raises KeyError/TypeError/ValueError."""
        raise NotImplementedError

    def to_json(self) -> bytes:
        return codec.encode_json(self.KIND, self.body())

    @classmethod
    def from_json(cls, payload: bytes | bytearray | memoryview | str) -> Self:
        """Decode and validate; raises only :class:`CodecError` (with the request id when the
        message carried one)."""
        return cls.from_object(codec.decode_json(payload, expect_kind=cls.KIND))

    @classmethod
    def from_object(cls, obj: Mapping[str, Any]) -> Self:
        """Validate the object of a decoded JSON message of this kind; raises only
        :class:`CodecError`."""
        try:
            return cls.from_body(obj)
        except KeyError as exc:
            raise CodecError(f"{cls.KIND}: missing field {exc}", _request_id(obj)) from exc
        except (TypeError, ValueError) as exc:
            raise CodecError(f"{cls.KIND}: {exc}", _request_id(obj)) from exc


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class ResultMessage(_JsonMessage):
    """The prediction for one request (``results``), from the last node or the fusion node.

    ``levels`` are the pruning levels the request ran at, per stage (per view for a fused
    result: None for a view that did not arrive). A fused result (:mod:`nodes.fusion`) also
    says which ``views`` it fused, which were ``missing``, why it fused then (``fused_on``) and how long it waited (``waited_s``); the
    four are absent (None) on a pipeline's result.
    """

    KIND: ClassVar[str] = "result"

    request_id: str
    camera: str
    label: str
    label_index: int
    score: float
    true_label: int | None
    correct: bool | None
    levels: tuple[int | None, ...]
    entry_ts: float
    attempt: int = 0
    views: tuple[int, ...] | None = None
    missing: tuple[int, ...] | None = None
    fused_on: str | None = None
    waited_s: float | None = None

    def __post_init__(self) -> None:
        _set(self, "request_id", codec.check_text(self.request_id, "request_id"))
        _set(self, "camera", codec.check_text(self.camera, "camera"))
        _set(self, "label", _text(self.label, "label"))
        _set(self, "label_index", codec.check_int(self.label_index, "label_index"))
        _set(self, "score", _fraction(self.score, "score"))
        _set(self, "true_label", _optional(codec.check_int, self.true_label, "true_label"))
        _set(self, "correct", _optional(_bool, self.correct, "correct"))
        levels = _sequence(self.levels, "levels")
        _set(self, "levels", tuple(_optional(codec.check_int, v, "levels") for v in levels))
        _set(self, "entry_ts", codec.check_float(self.entry_ts, "entry_ts"))
        _set(self, "attempt", codec.check_int(self.attempt, "attempt"))
        _set(self, "views", _optional(_ints, self.views, "views"))
        _set(self, "missing", _optional(_ints, self.missing, "missing"))
        _set(self, "fused_on", _optional(_text, self.fused_on, "fused_on"))
        _set(self, "waited_s", _optional(_seconds, self.waited_s, "waited_s"))

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "request_id": self.request_id,
            "camera": self.camera,
            "label": self.label,
            "label_index": self.label_index,
            "score": self.score,
            "true_label": self.true_label,
            "correct": self.correct,
            "levels": list(self.levels),
            "attempt": self.attempt,
            "entry_ts": self.entry_ts,
        }
        if self.views is not None:
            out["views"] = list(self.views)
        if self.missing is not None:
            out["missing"] = list(self.missing)
        if self.fused_on is not None:
            out["fused_on"] = self.fused_on
        if self.waited_s is not None:
            out["waited_s"] = self.waited_s
        return out

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Self:
        return cls(
            request_id=body["request_id"],
            camera=body["camera"],
            label=body["label"],
            label_index=body["label_index"],
            score=body["score"],
            true_label=body.get("true_label"),
            correct=body.get("correct"),
            levels=body["levels"],
            entry_ts=body["entry_ts"],
            attempt=body.get("attempt", 0),
            views=body.get("views"),
            missing=body.get("missing"),
            fused_on=body.get("fused_on"),
            waited_s=body.get("waited_s"),
        )


@dataclass(frozen=True)
class ExitMessage(_JsonMessage):
    """One finished request's timings (``exits``): the controller's latency signal.
    ``stages`` are the request's hops, one per stage, as in the stage message.

    ``latency_s`` is ``exit_ts - entry_ts`` from two clocks (the camera's and the last
    node's), so it is negative when the camera's clock is ahead; :meth:`causal_latency_s` is
    what a reader that needs a latency takes."""

    KIND: ClassVar[str] = "exit"

    request_id: str
    camera: str
    capture_ts: float
    entry_ts: float
    exit_ts: float
    latency_s: float
    stages: tuple[Hop, ...]
    attempt: int = 0
    correct: bool | None = None

    def __post_init__(self) -> None:
        _set(self, "request_id", codec.check_text(self.request_id, "request_id"))
        _set(self, "camera", codec.check_text(self.camera, "camera"))
        _set(self, "capture_ts", codec.check_float(self.capture_ts, "capture_ts"))
        _set(self, "entry_ts", codec.check_float(self.entry_ts, "entry_ts"))
        _set(self, "exit_ts", codec.check_float(self.exit_ts, "exit_ts"))
        _set(self, "latency_s", codec.check_float(self.latency_s, "latency_s"))
        _set(self, "attempt", codec.check_int(self.attempt, "attempt"))
        _set(self, "correct", _optional(_bool, self.correct, "correct"))
        stages = _sequence(self.stages, "stages")
        if not all(isinstance(h, Hop) for h in stages):
            raise TypeError("stages must be Hop values")
        _set(self, "stages", stages)

    def causal_latency_s(self) -> float:
        """``latency_s``, if the clocks that measured it agree (>= 0).

        Raises:
            CodecError: a negative latency (the camera's clock is ahead of the last node's).
        """
        if self.latency_s < 0:
            raise CodecError(
                f"exit latency must be >= 0, got {self.latency_s} (are the clocks synchronised?)",
                self.request_id,
            )
        return self.latency_s

    def body(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "camera": self.camera,
            "capture_ts": self.capture_ts,
            "entry_ts": self.entry_ts,
            "exit_ts": self.exit_ts,
            "latency_s": self.latency_s,
            "attempt": self.attempt,
            "correct": self.correct,
            "stages": [
                {
                    "stage": h.stage,
                    "node": h.node,
                    "queue_s": h.queue_s,
                    "compute_s": h.compute_s,
                    "level": h.level,
                }
                for h in self.stages
            ],
        }

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Self:
        stages = _sequence(body["stages"], "stages")
        if not all(isinstance(s, Mapping) for s in stages):
            raise TypeError("each exit stage must be an object")
        return cls(
            request_id=body["request_id"],
            camera=body["camera"],
            capture_ts=body["capture_ts"],
            entry_ts=body["entry_ts"],
            exit_ts=body["exit_ts"],
            latency_s=body["latency_s"],
            stages=tuple(
                Hop(s["stage"], s["node"], s["queue_s"], s["compute_s"], s["level"]) for s in stages
            ),
            attempt=body.get("attempt", 0),
            correct=body.get("correct"),
        )


# --------------------------------------------------------------------------- control


@dataclass(frozen=True)
class LevelMessage(_JsonMessage):
    """The pruning level of stage ``stage`` (retained ``control/stage/<i>``; the fusion
    pipeline's ``control/view/<v>`` carries the view index in ``stage``). ``seq`` is the
    decision that set it (None: set by hand or by a planner without decisions)."""

    KIND: ClassVar[str] = "level"

    stage: int
    level: int
    ratio: float
    seq: int | None = None
    reason: str = ""

    def __post_init__(self) -> None:
        _set(self, "stage", codec.check_int(self.stage, "stage"))
        _set(self, "level", codec.check_int(self.level, "level"))
        ratio = codec.check_float(self.ratio, "ratio", non_negative=True)
        if ratio >= 1.0:
            raise ValueError(f"ratio must lie in [0, 1), got {ratio}")
        _set(self, "ratio", ratio)
        _set(self, "seq", _optional(codec.check_int, self.seq, "seq"))
        _set(self, "reason", _text(self.reason, "reason"))

    def level_of(self, n_levels: int) -> int:
        """``level`` if the receiver has it (``0 <= level < n_levels``).

        Raises:
            CodecError: a level the receiver does not have.
        """
        if not self.level < n_levels:
            raise CodecError(f"level {self.level} out of range (this receiver has {n_levels})")
        return self.level

    def body(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "level": self.level,
            "ratio": self.ratio,
            "seq": self.seq,
            "reason": self.reason,
        }

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Self:
        return cls(
            stage=body["stage"],
            level=body["level"],
            ratio=body["ratio"],
            seq=body.get("seq"),
            reason=body.get("reason", ""),
        )


@dataclass(frozen=True)
class DecisionMessage(_JsonMessage):
    """One controller decision (``control/decisions``). The fields readers use are typed;
    the inputs behind the decision (``target_s``, ``predicted``, ``trigger``, ``slo_s``,
    ``a_min``, ``window``, ``arrival``, ``stages``: docs/topics.md) travel in ``details``,
    written beside them on the wire."""

    KIND: ClassVar[str] = "decision"
    TYPED: ClassVar[tuple[str, ...]] = (
        "seq",
        "at",
        "ts",
        "policy",
        "objective",
        "action",
        "reason",
        "how",
        "levels_before",
        "levels",
        "changed",
        "feasible",
    )

    seq: int
    at: float
    ts: float | None
    policy: str
    objective: str
    action: str
    reason: str
    how: str
    levels_before: tuple[int, ...]
    levels: tuple[int, ...]
    changed: tuple[int, ...]
    feasible: bool
    details: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _set(self, "seq", codec.check_int(self.seq, "seq"))
        _set(self, "at", codec.check_float(self.at, "at"))
        _set(self, "ts", _optional(codec.check_float, self.ts, "ts"))
        for name in ("policy", "objective", "action", "reason", "how"):
            _set(self, name, _text(getattr(self, name), name))
        for name in ("levels_before", "levels", "changed"):
            _set(self, name, _ints(getattr(self, name), name))
        if len(self.levels_before) != len(self.levels):
            raise ValueError("levels_before and levels must have one level per stage")
        if any(i >= len(self.levels) for i in self.changed):
            raise ValueError("changed names a stage the decision does not have")
        _set(self, "feasible", _bool(self.feasible, "feasible"))
        if not isinstance(self.details, Mapping) or not all(
            isinstance(k, str) for k in self.details
        ):
            raise TypeError("details must be a map with string keys")
        clash = set(self.details) & {*self.TYPED, "v", "kind"}
        if clash:
            raise ValueError(f"details must not repeat {sorted(clash)}")
        _set(self, "details", MappingProxyType(dict(self.details)))

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {name: getattr(self, name) for name in self.TYPED}
        for name in ("levels_before", "levels", "changed"):
            out[name] = list(out[name])
        out.update(self.details)
        return out

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Self:
        typed = {name: body[name] for name in cls.TYPED}
        details = {k: v for k, v in body.items() if k not in cls.TYPED and k not in ("v", "kind")}
        return cls(**typed, details=details)


# --------------------------------------------------------------------------- nodes


@dataclass(frozen=True)
class StatusMessage(_JsonMessage):
    """A service's retained status (``nodes/<node>/status``): ``online``, or ``offline`` with
    why (``"connection lost"`` is the Last Will). ``stage`` and ``bounds`` (blocks
    ``[start, end)``) say what a slice node serves; None while it waits for a plan, and for
    services that serve no stage (camera, fusion)."""

    KIND: ClassVar[str] = "status"

    node: str
    state: NodeState
    ts: float
    reason: str = ""
    stage: int | None = None
    bounds: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        _set(self, "node", _node(self.node))
        if self.state not in NODE_STATES:
            raise ValueError(f"state must be one of {list(NODE_STATES)}, got {self.state!r}")
        _set(self, "ts", codec.check_float(self.ts, "ts"))
        _set(self, "reason", _text(self.reason, "reason"))
        _set(self, "stage", _optional(codec.check_int, self.stage, "stage"))
        _set(self, "bounds", _optional(_bounds, self.bounds, "bounds"))

    @property
    def online(self) -> bool:
        return self.state == "online"

    def body(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "state": self.state,
            "reason": self.reason,
            "stage": self.stage,
            "bounds": None if self.bounds is None else list(self.bounds),
            "ts": self.ts,
        }

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Self:
        return cls(
            node=body["node"],
            state=body["state"],
            ts=body["ts"],
            reason=body.get("reason", ""),
            stage=body.get("stage"),
            bounds=body.get("bounds"),
        )


@dataclass(frozen=True)
class MetricsMessage(_JsonMessage):
    """A slice node's periodic telemetry (``nodes/<node>/metrics``, QoS 0). ``stage``,
    ``bounds``, ``level`` and ``ratio`` are None while the node is not placed; ``service_s``
    and ``compute_s`` until it served a request."""

    KIND: ClassVar[str] = "metrics"

    node: str
    ts: float
    stage: int | None = None
    bounds: tuple[int, int] | None = None
    level: int | None = None
    ratio: float | None = None
    queue_depth: int = 0
    service_s: float | None = None
    compute_s: float | None = None
    received: int = 0
    processed: int = 0
    errors: int = 0
    shed: int = 0
    level_changes: int = 0
    plan_version: int = -1
    emulated_factor: float = 1.0
    emulation: str = "none"
    uptime_s: float = 0.0

    COUNTERS: ClassVar[tuple[str, ...]] = (
        "queue_depth",
        "received",
        "processed",
        "errors",
        "shed",
        "level_changes",
    )

    def __post_init__(self) -> None:
        _set(self, "node", _node(self.node))
        _set(self, "ts", codec.check_float(self.ts, "ts"))
        _set(self, "stage", _optional(codec.check_int, self.stage, "stage"))
        _set(self, "bounds", _optional(_bounds, self.bounds, "bounds"))
        _set(self, "level", _optional(codec.check_int, self.level, "level"))
        _set(self, "ratio", _optional(_fraction, self.ratio, "ratio"))
        for name in self.COUNTERS:
            _set(self, name, codec.check_int(getattr(self, name), name, hi=_INT64))
        _set(self, "service_s", _optional(_seconds, self.service_s, "service_s"))
        _set(self, "compute_s", _optional(_seconds, self.compute_s, "compute_s"))
        _set(self, "plan_version", codec.check_int(self.plan_version, "plan_version", lo=-1))
        factor = codec.check_float(self.emulated_factor, "emulated_factor")
        if factor <= 0:
            raise ValueError(f"emulated_factor must be > 0, got {factor}")
        _set(self, "emulated_factor", factor)
        _set(self, "emulation", _text(self.emulation, "emulation"))
        _set(self, "uptime_s", _seconds(self.uptime_s, "uptime_s"))

    def body(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "stage": self.stage,
            "bounds": None if self.bounds is None else list(self.bounds),
            "level": self.level,
            "ratio": self.ratio,
            "queue_depth": self.queue_depth,
            "service_s": self.service_s,
            "compute_s": self.compute_s,
            "received": self.received,
            "processed": self.processed,
            "errors": self.errors,
            "shed": self.shed,
            "level_changes": self.level_changes,
            "plan_version": self.plan_version,
            "emulated_factor": self.emulated_factor,
            "emulation": self.emulation,
            "uptime_s": self.uptime_s,
            "ts": self.ts,
        }

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Self:
        optional = {f.name: body.get(f.name, f.default) for f in fields(cls)[2:]}
        return cls(node=body["node"], ts=body["ts"], **optional)


@dataclass(frozen=True)
class ErrorMessage(_JsonMessage):
    """What a service refused (``errors/<node>``; the controller's on ``errors``): ``node``
    is who refused it (a node id, or ``controller``), ``size`` the payload's bytes (``bytes``
    on the wire), ``shed`` whether a full queue shed it."""

    KIND: ClassVar[str] = "error"

    node: str
    topic: str
    reason: str
    ts: float
    stage: int | None = None
    request_id: str | None = None
    size: int = 0
    shed: bool = False

    def __post_init__(self) -> None:
        _set(self, "node", _node(self.node))
        _set(self, "topic", _text(self.topic, "topic"))
        _set(self, "reason", _text(self.reason, "reason"))
        _set(self, "ts", codec.check_float(self.ts, "ts"))
        _set(self, "stage", _optional(codec.check_int, self.stage, "stage"))
        _set(self, "request_id", _optional(codec.check_text, self.request_id, "request_id"))
        _set(self, "size", codec.check_int(self.size, "bytes", hi=_INT64))
        _set(self, "shed", _bool(self.shed, "shed"))

    def body(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "stage": self.stage,
            "topic": self.topic,
            "request_id": self.request_id,
            "reason": self.reason,
            "bytes": self.size,
            "shed": self.shed,
            "ts": self.ts,
        }

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Self:
        return cls(
            node=body["node"],
            topic=body["topic"],
            reason=body["reason"],
            ts=body["ts"],
            stage=body.get("stage"),
            request_id=body.get("request_id"),
            size=body.get("bytes", 0),
            shed=body.get("shed", False),
        )


# --------------------------------------------------------------------------- catalogue

JsonMessage = (
    ResultMessage
    | ExitMessage
    | LevelMessage
    | PlanMessage
    | DecisionMessage
    | StatusMessage
    | MetricsMessage
    | ErrorMessage
)

CATALOGUE: Mapping[str, Any] = MappingProxyType(
    {
        "stage": StageMessage,
        ResultMessage.KIND: ResultMessage,
        ExitMessage.KIND: ExitMessage,
        LevelMessage.KIND: LevelMessage,
        "plan": PlanMessage,
        DecisionMessage.KIND: DecisionMessage,
        StatusMessage.KIND: StatusMessage,
        MetricsMessage.KIND: MetricsMessage,
        ErrorMessage.KIND: ErrorMessage,
    }
)
"""Every message kind, by its ``kind``."""


def decode_any(
    payload: bytes | bytearray | memoryview, *, max_bytes: int | None = None
) -> JsonMessage:
    """The message of a JSON payload of any kind (for readers of many topics: ``tap``,
    ``top``, the experiment's recorder).

    Raises:
        CodecError: not a JSON message, an unknown kind, or a bad message of its kind.
    """
    limit = codec.DEFAULT_MAX_JSON_BYTES if max_bytes is None else max_bytes
    obj = codec.decode_json(payload, max_bytes=limit)  # decoded once, whatever the kind
    kind = obj["kind"]
    cls = CATALOGUE.get(kind)
    if cls is None or cls is StageMessage:
        raise CodecError(f"unknown JSON message kind {kind!r}")
    if cls is PlanMessage:  # validated by its own module
        return PlanMessage.from_json(bytes(payload))
    message: JsonMessage = cls.from_object(obj)
    return message


# --------------------------------------------------------------------------- field checks
# (raise TypeError/ValueError; from_json translates them into CodecError)


def _request_id(obj: Mapping[str, Any]) -> str | None:
    rid = obj.get("request_id")
    return rid if isinstance(rid, str) and 0 < len(rid) <= codec.MAX_NAME else None


def _optional(check: Any, value: Any, what: str) -> Any:
    return None if value is None else check(value, what)


def _text(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, got {type(value).__name__}")
    return value


def _bool(value: object, what: str) -> bool:
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"{what} must be true or false, got {type(value).__name__}")
    return bool(value)


def _node(value: object) -> str:
    try:
        return check_name("node", _text(value, "node"))
    except ConfigError as exc:
        raise ValueError(str(exc)) from exc


def _seconds(value: object, what: str) -> float:
    return codec.check_float(value, what, non_negative=True)


def _fraction(value: object, what: str) -> float:
    out = codec.check_float(value, what, non_negative=True)
    if out > 1.0:
        raise ValueError(f"{what} must lie in [0, 1], got {out}")
    return out


def _sequence(value: object, what: str) -> tuple[Any, ...]:
    if not isinstance(value, list | tuple):
        raise TypeError(f"{what} must be a list, got {type(value).__name__}")
    if len(value) > codec.MAX_HOPS:
        raise ValueError(f"{what} has more than {codec.MAX_HOPS} entries")
    return tuple(value)


def _ints(value: object, what: str) -> tuple[int, ...]:
    return tuple(codec.check_int(v, what) for v in _sequence(value, what))


def _bounds(value: object, what: str) -> tuple[int, int]:
    items = _ints(value, what)
    if len(items) != 2 or not items[0] < items[1]:
        raise ValueError(f"{what} must be [start, end) with start < end, got {value!r}")
    return items[0], items[1]
