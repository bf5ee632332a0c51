"""Live estimates the controller keeps: each stage's slowdown, and the arrival rate.

**Slowdown.** Stage i's slowdown is ``s_i = measured service time / calibrated t_i(level)``,
where t_i is the calibration's :class:`~pipeline.calibration.latency.LinearFit` at the ratio of
the level the request actually ran at. A node emulated (or really) 2x slower gives ``s_i = 2``
and the optimizer then sees every level of that slice as 2x slower.

- Primary source: the per-stage hops of ``exits`` messages. Each hop carries the node's busy
  time for that request (compute plus emulated wait) and the level it ran at, so a sample is
  exact even right after a level change.
- Under backlog: the node's throughput. While a node has requests waiting at both ends of a
  metrics interval (queue depth >= 2) and its level did not change, ``dt / processed`` is its
  true cycle time per request, including the per-request work outside the timed section
  (decoding, publishing, event-loop scheduling) that ``service_s`` misses. This is exactly
  when the capacity matters, so the larger of the two estimates wins.
- Fallback, when no hop of the stage arrived within ``window_s`` (nothing leaves the
  pipeline): the node's metrics ``service_s`` (a median over its last requests), only when the
  node's level has not changed for at least ``window_s`` (else the median mixes levels).
- The raw estimate is the MEAN of the samples of the last ``window_s`` seconds, not the
  median: a stage's capacity is 1 / its mean service time, and under CPU contention service
  times are heavy-tailed (an emulated device multiplies every compute spike by k), so a median
  overstates the capacity. It is then smoothed by an EWMA with time constant ``tau_s``
  (updated on every controller tick: ``s += (1 - exp(-dt / tau)) (raw - s)``). The first raw
  estimate is taken as is; before any sample, ``s = 1`` (the calibration is trusted).
- Not clamped at 1: a device may genuinely be faster than the one that was calibrated, and the
  planner compares absolute service times with the capacity the arrival rate needs. It is
  bounded to ``[lo, hi]`` (default ``[0.1, 1000]``) only to reject garbage.

**Arrival rate.** Arrivals are counted from the stage-0 nodes' metrics (deltas of their
``received`` counter: every image the camera published reached stage 0, even the ones waiting
in its queue) when such metrics are fresh, else from ``exits`` (which under overload measure
the pipeline's throughput, not the offered load). Both are time-decayed averages
(:class:`~controller.policy.ArrivalRate`, time constant ``tau_s``). This is the controller's
only arrival rate: the proactive policy reads the stage-0 one (``ArrivalTracker.from_stage0``)
rather than counting the same deltas again.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Sequence

from controller.policy import ArrivalRate
from pipeline.calibration import LinearFit

_MIN_TIME_S = 1e-6  # a calibrated time at or below this cannot be divided by


class StageSlowdown:
    """The live slowdown of one stage (see the module docstring)."""

    def __init__(
        self,
        fit: LinearFit,
        ratios: Sequence[float],
        *,
        window_s: float,
        tau_s: float,
        lo: float,
        hi: float,
    ) -> None:
        self.fit = fit
        self.ratios = tuple(float(r) for r in ratios)
        self.window_s = window_s
        self.tau_s = tau_s
        self.lo, self.hi = lo, hi
        self.value = 1.0
        self.raw: float | None = None
        self.source = "prior"
        self.samples_seen = 0
        self._samples: deque[tuple[float, float]] = deque()
        self._busy: deque[tuple[float, float, float]] = deque()  # (t, seconds, calibrated)
        self._metrics: tuple[float, float] | None = None
        self._updated_at: float | None = None

    def calibrated_s(self, level: int) -> float:
        """t_i(level) from the calibration (never below zero)."""
        return max(0.0, self.fit.predict(self.ratios[level]))

    def live_s(self, level: int) -> float:
        """Predicted service time at ``level`` on this node now: t_i(level) * s_i."""
        return self.calibrated_s(level) * self.value

    def _sample(self, level: int, service_s: float) -> float | None:
        if not 0 <= level < len(self.ratios) or not math.isfinite(service_s) or service_s < 0:
            return None
        base = self.calibrated_s(level)
        return service_s / base if base > _MIN_TIME_S else None

    def add_hop(self, now: float, level: int, service_s: float) -> None:
        """One request's busy time at this stage (from an exit message)."""
        sample = self._sample(level, service_s)
        if sample is not None:
            self._samples.append((now, sample))
            self.samples_seen += 1

    def add_busy(self, now: float, level: int, seconds: float, done: int) -> None:
        """``done`` requests served in ``seconds`` while the node stayed backlogged at
        ``level``; the estimate over a window is sum(seconds) / sum(done * t_i(level))."""
        if 0 <= level < len(self.ratios) and seconds > 0 and done > 0:
            base = self.calibrated_s(level)
            if base > _MIN_TIME_S:
                self._busy.append((now, seconds, done * base))

    def add_metrics(self, now: float, level: int, service_s: float) -> None:
        """The node's reported median service time, its level stable for ``window_s``."""
        sample = self._sample(level, service_s)
        if sample is not None:
            self._metrics = (now, sample)

    def update(self, now: float) -> float:
        """Refresh the raw estimate and advance the EWMA to ``now``; returns ``value``."""
        horizon = now - self.window_s
        while self._samples and self._samples[0][0] < horizon:
            self._samples.popleft()
        while self._busy and self._busy[0][0] < horizon:
            self._busy.popleft()
        raw: float | None = None
        if self._samples:
            raw, self.source = statistics.fmean(s for _, s in self._samples), "exits"
        if self._busy:
            busy = sum(b[1] for b in self._busy) / sum(b[2] for b in self._busy)
            if raw is None or busy > raw:
                raw, self.source = busy, "backlog"
        if raw is None and self._metrics is not None and self._metrics[0] >= horizon:
            raw, self.source = self._metrics[1], "metrics"
        if raw is not None:
            raw = min(max(raw, self.lo), self.hi)
            if self.raw is None or self._updated_at is None:
                self.value = raw
            else:
                alpha = -math.expm1(-max(0.0, now - self._updated_at) / self.tau_s)
                self.value += alpha * (raw - self.value)
            self.raw = raw
        self._updated_at = now
        return self.value


class ArrivalTracker:
    """Arrival rate from stage-0 ``received`` deltas (preferred) or from exits."""

    def __init__(self, tau_s: float, start: float, max_age_s: float) -> None:
        self.tau_s = tau_s
        self.max_age_s = max_age_s
        self.from_exits = ArrivalRate(tau_s, start)
        # counted from the first stage-0 report; the proactive policy reads this one
        self.from_stage0 = ArrivalRate(tau_s)
        self._received: dict[str, int] = {}
        self._stage0_at: float | None = None

    def on_stage0_metrics(self, now: float, node: str, received: int) -> int:
        """A stage-0 node's ``received`` counter; returns the new arrivals it reveals (the
        first report of a node is its baseline; a counter that went down means a restart)."""
        last = self._received.get(node)
        self._received[node] = received
        self._stage0_at = now
        if self.from_stage0.start is None:
            self.from_stage0.start = now
        if last is None:
            return 0
        delta = received - last if received >= last else received
        if delta > 0:
            self.from_stage0.observe(now, delta)
        return delta

    def on_exit(self, now: float) -> None:
        self.from_exits.observe(now)

    def rate(self, now: float) -> tuple[float | None, str]:
        """(requests per second, source): ``stage0`` while its metrics are fresh, else
        ``exits``."""
        if self._stage0_at is not None and now - self._stage0_at <= self.max_age_s:
            return self.from_stage0.rate(now), "stage0"
        return self.from_exits.rate(now), "exits"
