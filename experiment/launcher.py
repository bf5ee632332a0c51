"""The processes of one experiment run: start them, watch them, and always clean them up.

One :class:`ProcessGroup` owns every child it starts. Each child runs in its own session and
process group (``start_new_session``), so a Ctrl-C in the terminal reaches only the harness,
which then stops the children in order (camera, controller, nodes, hogs: last started, first
stopped) with SIGTERM, and SIGKILLs whole process groups that do not exit in time. The group is
a context manager; :func:`signals_as_interrupt` turns SIGTERM and SIGHUP into the same
``KeyboardInterrupt`` as Ctrl-C, so the ``finally`` that stops the group always runs.
:meth:`ProcessGroup.survivors` lists any process left in a child's process group after stop:
a clean run has none.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType

from pipeline.errors import EdgepruneError

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]


class ExperimentError(EdgepruneError):
    """A process of the experiment failed to start, died, or did not become ready."""


@dataclass
class Child:
    """One started process: its role name, handle, log file and whether it may exit early."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    argv: tuple[str, ...]
    expect_exit: bool = False  # True for processes that finish on their own (camera, hogs)

    @property
    def pgid(self) -> int:
        return self.proc.pid  # the leader of its own session and group

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        tail = text.strip().splitlines()[-lines:]
        return "\n".join("    " + line for line in tail) if tail else "    (empty log)"


class ProcessGroup:
    """Starts `python -m edgeprune ...` (or any) children, each in its own process group, with
    stdout and stderr in ``log_dir/<name>.log``; stops all of them on exit."""

    def __init__(
        self, log_dir: Path, *, python: str = sys.executable, cwd: Path | None = None
    ) -> None:
        self.log_dir = Path(log_dir)
        self.python = python
        self.cwd = cwd or Path.cwd()
        self.children: list[Child] = []
        self._stopped_pgids: list[int] = []

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()

    def start(
        self,
        name: str,
        args: Sequence[str],
        *,
        module: str = "edgeprune",
        stdout_path: Path | None = None,
        expect_exit: bool = False,
        cpu: int | None = None,
    ) -> Child:
        """Start ``python -m <module> <args>``; with ``stdout_path`` stdout goes there (e.g. a
        ``--json`` summary) and only stderr to the log. ``cpu`` pins it to one core (Linux)."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        argv = (self.python, "-m", module, *args)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with contextlib.ExitStack() as files:
            err = files.enter_context(log_path.open("ab"))
            out = files.enter_context(stdout_path.open("wb")) if stdout_path else err
            try:
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    cwd=self.cwd,
                    env=env,
                    start_new_session=True,
                )
            except OSError as exc:
                raise ExperimentError(f"cannot start {name}: {exc}") from exc
        if cpu is not None and hasattr(os, "sched_setaffinity"):
            with contextlib.suppress(OSError):
                os.sched_setaffinity(proc.pid, {cpu})
        child = Child(name, proc, log_path, argv, expect_exit)
        self.children.append(child)
        log.debug("started %s (pid %d): %s", name, proc.pid, " ".join(argv))
        return child

    def check_alive(self) -> None:
        """Raise if a child that should still run has exited (with the tail of its log)."""
        for c in self.children:
            code = c.proc.poll()
            if code is not None and not c.expect_exit:
                raise ExperimentError(
                    f"{c.name} (pid {c.proc.pid}) exited with code {code}; "
                    f"its log {c.log_path}:\n{c.log_tail()}"
                )

    def stop(self, child: Child, timeout: float = 15.0) -> int | None:
        """SIGTERM the child (SIGCONT first, in case it is stopped), wait, then SIGKILL its
        whole process group; returns its exit code."""
        proc = child.proc
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGCONT)
                proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning(
                    "%s (pid %d) ignored SIGTERM for %.0f s; killing its process group",
                    child.name,
                    proc.pid,
                    timeout,
                )
        _kill_group(child.pgid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5.0)
        self._stopped_pgids.append(child.pgid)
        return proc.returncode

    def stop_all(self, timeout: float = 15.0) -> None:
        """Stop every child, last started first. Idempotent."""
        for child in reversed(self.children):
            if child.pgid not in self._stopped_pgids:
                self.stop(child, timeout)

    def survivors(self) -> list[int]:
        """Pids still alive in the process group of any stopped child (should be empty)."""
        alive = []
        for pgid in self._stopped_pgids:
            alive += _group_members(pgid)
        return alive


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _group_members(pgid: int) -> list[int]:
    """Pids whose process group is ``pgid`` (from /proc; empty where /proc is missing)."""
    members = []
    proc = Path("/proc")
    if not proc.is_dir():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, 0)
            return [pgid]
        return []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...; comm may contain spaces and parentheses
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


@contextlib.contextmanager
def signals_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise ``KeyboardInterrupt`` like Ctrl-C does, so
    cleanup in ``finally`` runs whichever way the harness is asked to stop. Main thread only."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        with contextlib.suppress(ValueError):  # not the main thread: leave as is
            previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def wait_for(
    predicate: object,
    timeout: float,
    what: str,
    group: ProcessGroup | None = None,
    poll_s: float = 0.05,
) -> None:
    """Poll ``predicate()`` until true (a deadline, not a fixed sleep); raise on timeout or when
    a child of ``group`` died meanwhile."""
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if group is not None:
            group.check_alive()
        if time.monotonic() > deadline:
            raise ExperimentError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll_s)
