"""The request journal at the source: every accepted image is kept until its result is seen.

A camera records each request before publishing it, re-sends requests whose result has not
arrived after a timeout, and marks a request done on its first result; later results for the
same request id are duplicates and are counted, not delivered twice. Backed by SQLite: a file
survives a restart of the camera process, ``:memory:`` (the default) lives as long as it does.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    request_id TEXT PRIMARY KEY,
    camera     TEXT NOT NULL,
    payload    BLOB NOT NULL,
    first_sent REAL NOT NULL,
    last_sent  REAL NOT NULL,
    attempts   INTEGER NOT NULL DEFAULT 1,
    done_ts    REAL
);
CREATE INDEX IF NOT EXISTS pending ON requests (done_ts, last_sent);
"""


@dataclass(frozen=True)
class PendingRequest:
    request_id: str
    camera: str
    payload: bytes
    attempts: int
    first_sent: float


@dataclass(frozen=True)
class JournalStats:
    accepted: int
    done: int
    pending: int
    resent: int  # re-sends in total (attempts beyond the first)


class RequestJournal:
    """SQLite-backed journal of requests in flight. Not thread-safe: use from one thread."""

    def __init__(self, path: Path | str = ":memory:") -> None:
        self.path = str(path)
        self._db = sqlite3.connect(self.path, isolation_level=None)
        self._db.execute(
            "PRAGMA journal_mode=WAL" if self.path != ":memory:" else "PRAGMA journal_mode=MEMORY"
        )
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self.duplicates = 0

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> RequestJournal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add(self, request_id: str, camera: str, payload: bytes, now: float | None = None) -> None:
        """Record a request before it is first published."""
        now = time.time() if now is None else now
        self._db.execute(
            "INSERT OR IGNORE INTO requests (request_id, camera, payload, first_sent, last_sent)"
            " VALUES (?, ?, ?, ?, ?)",
            (request_id, camera, payload, now, now),
        )

    def due(
        self, timeout_s: float, now: float | None = None, limit: int = 1000
    ) -> list[PendingRequest]:
        """Requests without a result whose last send is older than ``timeout_s``."""
        now = time.time() if now is None else now
        rows = self._db.execute(
            "SELECT request_id, camera, payload, attempts, first_sent FROM requests "
            "WHERE done_ts IS NULL AND last_sent <= ? ORDER BY first_sent LIMIT ?",
            (now - timeout_s, limit),
        ).fetchall()
        return [PendingRequest(r[0], r[1], bytes(r[2]), r[3], r[4]) for r in rows]

    def mark_resent(self, request_id: str, now: float | None = None) -> None:
        now = time.time() if now is None else now
        self._db.execute(
            "UPDATE requests SET last_sent = ?, attempts = attempts + 1 WHERE request_id = ?",
            (now, request_id),
        )

    def complete(self, request_id: str, now: float | None = None) -> bool:
        """Mark a request done; True on its first result, False for a duplicate or unknown."""
        now = time.time() if now is None else now
        cur = self._db.execute(
            "UPDATE requests SET done_ts = ?, payload = x'' "
            "WHERE request_id = ? AND done_ts IS NULL",
            (now, request_id),
        )
        if cur.rowcount == 1:
            return True
        if self._db.execute(
            "SELECT 1 FROM requests WHERE request_id = ?", (request_id,)
        ).fetchone():
            self.duplicates += 1
        return False

    def stats(self) -> JournalStats:
        accepted, done, resent = self._db.execute(
            "SELECT COUNT(*), COUNT(done_ts), COALESCE(SUM(attempts - 1), 0) FROM requests"
        ).fetchone()
        return JournalStats(accepted, done, accepted - done, resent)
