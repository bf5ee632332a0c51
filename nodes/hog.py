"""A real CPU hog: a process that burns one core during given windows of the experiment clock.

Emulation in :mod:`nodes.emulation` slows a node down by waiting; a hog really competes for the
CPU, the way a background upload or a second program on a Raspberry Pi would. The experiment
harness starts one hog per node that asks for it (``cpu_hog`` or ``hog_windows`` in its
``[emulation.<node>]`` table), pinned to the same core as the node when the OS allows, so
``edgeprune node`` needs to know nothing about it::

    python -m nodes.hog --clock-start 1700000000.0 --window 20:40 --window 70:90 [--cpu 1]

Between windows the process sleeps (until the next window opens, not polling); during a window
it spins in pure Python, which holds one core (the GIL keeps it to one). It exits after the last
window, or at once on SIGTERM / SIGINT.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence

_SPIN_CHECK_S = 0.01  # how often a burning hog looks at the clock and the stop flag


def parse_window(text: str) -> tuple[float, float]:
    """``START:END`` seconds -> (start, end); raises ValueError when malformed or empty."""
    parts = text.split(":")
    if len(parts) != 2:
        raise ValueError(f"hog window {text!r} is not START:END")
    start, end = float(parts[0]), float(parts[1])
    if not 0 <= start < end:
        raise ValueError(f"hog window [{start}, {end}) is empty")
    return start, end


def burn_until(deadline: float, stop: threading.Event) -> int:
    """Spin on one core until the wall clock reaches ``deadline`` or ``stop`` is set; returns
    the number of loop iterations (a rough measure of the work done)."""
    spins = 0
    while not stop.is_set():
        check = min(deadline, time.time() + _SPIN_CHECK_S)
        while time.time() < check:
            spins += 1
        if time.time() >= deadline:
            break
    return spins


def run(
    clock_start: float, windows: Sequence[tuple[float, float]], stop: threading.Event | None = None
) -> list[tuple[float, float]]:
    """Burn during each window (seconds after ``clock_start``), sleep in between.

    Returns the wall-clock spans actually burnt (a window already over is skipped, one already
    open is joined late).
    """
    stop = stop or threading.Event()
    spans = []
    for start, end in sorted(windows):
        if stop.is_set():
            break
        begin, finish = clock_start + start, clock_start + end
        if time.time() >= finish:
            continue
        stop.wait(max(0.0, begin - time.time()))
        if stop.is_set():
            break
        t0 = time.time()
        burn_until(finish, stop)
        spans.append((t0, time.time()))
    return spans


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nodes.hog",
        description="Burn one CPU core during the given windows "
        "of the experiment clock (seconds after --clock-start).",
    )
    parser.add_argument(
        "--clock-start", type=float, required=True, help="epoch seconds the windows count from"
    )
    parser.add_argument(
        "--window",
        action="append",
        required=True,
        metavar="START:END",
        help="burn from START to END seconds (repeatable)",
    )
    parser.add_argument(
        "--cpu", type=int, default=None, help="pin the hog to this CPU core (Linux)"
    )
    args = parser.parse_args(argv)
    try:
        windows = [parse_window(w) for w in args.window]
    except ValueError as exc:
        parser.error(str(exc))
    if args.cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.cpu})
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    spans = run(args.clock_start, windows, stop)
    burnt = sum(b - a for a, b in spans)
    print(f"hog: burnt one core for {burnt:.1f} s in {len(spans)} window(s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
