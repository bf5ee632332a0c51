"""Turn traces into a replay schedule: when (seconds after replay start) to send which image.

The schedule is a pure function of its inputs: nothing sleeps here. A replayer (the camera
publisher) walks the list and waits until each ``send_at_s``, e.g.::

    start = loop.time()
    for item in replay_schedule([trace], compression=60, max_idle_s=120):
        await asyncio.sleep(max(0.0, start + item.send_at_s - loop.time()))
        await publish(item.arrival)

Steps, in order:

1. **Merge** the arrivals of all traces on one timeline. ``align="start"`` (default) puts
   every trace's own start (``t = 0``) at the same instant, which is what you want when
   combining cameras from different deployments; ``align="clock"`` places traces by their
   wall-clock ``t0`` (all traces need one), relative to the earliest.
2. **Window**: keep arrivals with ``start <= t < end`` (merged-timeline seconds); the window
   start becomes time 0. Without a window, time 0 is the common start.
3. **Cap idle gaps**: any silence longer than ``max_idle_s`` (between two consecutive
   arrivals of the merged stream, or before the first one) is shortened to ``max_idle_s``.
   Real traces are mostly silence (a camera-trap day has a few busy minutes); capping keeps the
   bursts intact, and their internal timing, while a demo or test no longer waits hours for
   them. This is done *before* compression, so ``max_idle_s`` is in trace seconds.
4. **Compress**: divide times by ``compression`` (60 means one trace minute per second).
5. **Offset** by ``start_offset_s`` and keep the first ``max_images`` items.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

from pipeline.errors import TraceError
from traces.format import Arrival, Trace


class ScheduledArrival(NamedTuple):
    """Send ``arrival`` ``send_at_s`` seconds after the replay starts."""

    send_at_s: float
    arrival: Arrival


def _merged(traces: Sequence[Trace], align: str) -> list[tuple[float, int, Arrival]]:
    shifts = [0.0] * len(traces)
    if align == "clock":
        if any(t.t0 is None for t in traces):
            raise TraceError("align='clock' needs every trace to have a t0")
        earliest = min(t.t0 for t in traces if t.t0 is not None)
        shifts = [(t.t0 - earliest).total_seconds() for t in traces if t.t0 is not None]
    elif align != "start":
        raise TraceError(f"align must be 'start' or 'clock', got {align!r}")
    merged = [
        (a.t + shift, i, a)
        for i, (trace, shift) in enumerate(zip(traces, shifts, strict=True))
        for a in trace.arrivals
    ]
    merged.sort(key=lambda item: (item[0], item[1], item[2].camera))
    return merged


def replay_schedule(
    traces: Sequence[Trace],
    compression: float = 1.0,
    start_offset_s: float = 0.0,
    max_images: int | None = None,
    window: tuple[float, float] | None = None,
    max_idle_s: float | None = None,
    align: Literal["start", "clock"] = "start",
) -> list[ScheduledArrival]:
    """The merged, windowed, idle-capped and compressed send schedule (see module docstring).

    Items are ordered by ``send_at_s`` (ties keep trace order, then camera name).
    """
    if not math.isfinite(compression) or compression <= 0:
        raise TraceError(f"compression must be > 0, got {compression}")
    if not math.isfinite(start_offset_s) or start_offset_s < 0:
        raise TraceError(f"start_offset_s must be >= 0, got {start_offset_s}")
    if max_images is not None and max_images < 0:
        raise TraceError(f"max_images must be >= 0, got {max_images}")
    if max_idle_s is not None and (not math.isfinite(max_idle_s) or max_idle_s < 0):
        raise TraceError(f"max_idle_s must be >= 0, got {max_idle_s}")
    lo, hi = 0.0, math.inf
    if window is not None:
        lo, hi = float(window[0]), float(window[1])
        if not (lo < hi) or lo < 0 or math.isnan(hi):
            raise TraceError(f"window must be (start, end) with 0 <= start < end, got {window}")
    out: list[ScheduledArrival] = []
    previous = lo  # trace time of the previous kept arrival (the window start at first)
    removed = 0.0  # idle seconds cut so far
    for t, _, arrival in _merged(traces, align):
        if t < lo:
            continue
        if t >= hi or (max_images is not None and len(out) >= max_images):
            break
        if max_idle_s is not None and t - previous > max_idle_s:
            removed += (t - previous) - max_idle_s
        previous = t
        out.append(ScheduledArrival(start_offset_s + (t - lo - removed) / compression, arrival))
    return out


def schedule_duration_s(schedule: Sequence[ScheduledArrival]) -> float:
    """When the last item is sent (0 for an empty schedule)."""
    return schedule[-1].send_at_s if schedule else 0.0
