"""What the oracle policy knows about a scenario, written for its controller before a run.

The schedule is cut at every start and end of any node's slowdown window (and at 0). Per
segment: each stage's known slowdown, the node's emulated factor at the segment's start
(``Emulation.factor_at``: constant factor times the window's; the calibration was measured
without emulation; the controller multiplies it by the machine factor it measures, see
:class:`controller.oracle.OraclePolicy`), and the
arrival rate the trace brings: the peak, over the segment, of the arrivals in a sliding window
of the controller's ``rate_tau_s`` (the time constant of the rate the live policies plan with).
The levels of a segment hold for the whole of it, so they are planned for its busiest moment.
CPU-hog windows are not in the schedule: their effect is not a known factor.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

from controller.oracle import OracleSchedule, OracleSegment
from experiment.config import ExperimentConfig


def peak_rate(send_times: Sequence[float], start: float, end: float, window_s: float) -> float:
    """The largest number of sends in any ``window_s`` (or the segment, if shorter) within
    ``[start, end)``, per second; 0.0 when the segment has none. ``send_times`` sorted."""
    lo = bisect.bisect_left(send_times, start)
    hi = bisect.bisect_left(send_times, end)
    if hi <= lo:
        return 0.0
    width = min(window_s, end - start)
    best = 0
    for i in range(lo, hi):
        j = bisect.bisect_left(send_times, send_times[i] + width, i, hi)
        best = max(best, j - i)
    return best / width


def breakpoints(config: ExperimentConfig) -> list[float]:
    """0 and every slowdown window's start and end, sorted."""
    points = {0.0}
    for node in config.nodes:
        for w in node.emulation.windows:
            points.update((w.start_s, w.end_s))
    return sorted(points)


def oracle_schedule(
    config: ExperimentConfig, send_times: Sequence[float], clock_start: float
) -> OracleSchedule:
    """The oracle's schedule for one run whose clock 0 is ``clock_start`` (epoch seconds);
    ``send_times``: the camera's planned sends, seconds after clock 0."""
    times = sorted(send_times)
    window = config.controller_config().rate_tau_s
    points = breakpoints(config)
    segments = []
    for k, start in enumerate(points):
        end = points[k + 1] if k + 1 < len(points) else math.inf
        segments.append(
            OracleSegment(
                start_s=start,
                slowdowns=tuple(n.emulation.factor_at(start) for n in config.nodes),
                rate=peak_rate(times, start, end, window),
            )
        )
    return OracleSchedule(clock_start, tuple(segments))
