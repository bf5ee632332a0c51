"""The exception tree of edgeprune. Third-party errors are translated at one boundary each,
with ``raise ... from exc``.

EdgepruneError
 +-- ConfigError        a bad config file, plan, device file or command-line value
 +-- CheckpointError    a checkpoint that cannot be loaded or does not fit the request
 +-- DatasetError       a dataset that cannot be fetched, read or split
 +-- CodecError         a message that cannot be decoded (malformed, wrong version, dtype,
 |                      shape, size) or has a bad field (bus.messages): the one error of a
 |                      bad message; carries ``request_id`` when it could be read
 +-- TraceError         a trace file with a malformed row (carries the line number)
 +-- BrokerError        Mosquitto cannot be started or does not answer
 +-- BusError           the broker refused or lost a subscription or a direct publish
                        (bus/session.py translates the MQTT client's errors into it)
"""

from __future__ import annotations


class EdgepruneError(Exception):
    """Base class of every error edgeprune raises on purpose."""


class ConfigError(EdgepruneError):
    """A bad configuration value, file or combination of options."""


class CheckpointError(EdgepruneError):
    """A checkpoint that cannot be loaded or does not match what is asked of it."""


class DatasetError(EdgepruneError):
    """A dataset that cannot be fetched, read or split."""


class CodecError(EdgepruneError):
    """A message that cannot be decoded. ``request_id`` is set when it could be read."""

    def __init__(self, reason: str, request_id: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.request_id = request_id


class TraceError(EdgepruneError):
    """A malformed trace file; ``line`` is the 1-based line number when known."""

    def __init__(self, reason: str, line: int | None = None) -> None:
        super().__init__(f"line {line}: {reason}" if line is not None else reason)
        self.reason = reason
        self.line = line


class BrokerError(EdgepruneError):
    """Mosquitto cannot be started, or does not answer in time."""


class BusError(EdgepruneError):
    """A subscription or a direct publish that the broker refused or the connection lost
    (a lost connection itself is no error: the session reconnects)."""


def stop_reason(exc: BaseException) -> str:
    """The ``reason`` of the retained ``offline`` status of a service that stops on ``exc``."""
    return f"stopped on error: {type(exc).__name__}: {exc}"[:200]


def internal_error(exc: BaseException) -> str:
    """The ``reason`` on ``errors`` of an unexpected failure while handling one message (the
    service serves on)."""
    return f"internal error: {type(exc).__name__}: {exc}"
