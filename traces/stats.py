"""Statistics of a trace: per-minute counts and their dispersion, visits, bursts, time of day.

Vocabulary (used by the model too):

- a **visit** is a run of images from one camera with no gap longer than ``visit_gap_s``
  (default 60 s) between consecutive images: one animal or herd passing;
- a **trigger** is a run of images inside a visit with no gap longer than ``burst_gap_s``
  (default 1.5 s): one burst the camera fires per motion detection;
- the **index of dispersion** of per-minute counts is var/mean. A Poisson stream has 1; the
  real traces have about 20 because images come in bursts.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from traces.format import Trace

VISIT_GAP_S = 60.0
BURST_GAP_S = 1.5


@dataclass(frozen=True)
class Visit:
    """The image times (seconds since the trace start, sorted) of one visit at one camera."""

    camera: str
    times: tuple[float, ...]

    @property
    def start(self) -> float:
        return self.times[0]

    @property
    def end(self) -> float:
        return self.times[-1]

    def __len__(self) -> int:
        return len(self.times)


def per_bin_counts(trace: Trace, bin_s: float = 60.0) -> np.ndarray:
    """Images per ``bin_s`` bin over the whole observation window ``[0, trace.span_s]``."""
    if bin_s <= 0:
        raise ValueError("bin_s must be > 0")
    n_bins = max(1, math.ceil(trace.span_s / bin_s))
    times = np.asarray(trace.times(), dtype=float)
    idx = np.minimum((times // bin_s).astype(np.int64), n_bins - 1)
    return np.bincount(idx, minlength=n_bins)


def per_minute_counts(trace: Trace) -> np.ndarray:
    """Images per minute over the observation window."""
    return per_bin_counts(trace, 60.0)


def index_of_dispersion(counts: np.ndarray) -> float:
    """var/mean of counts (population variance); NaN when the mean is 0."""
    counts = np.asarray(counts, dtype=float)
    mean = counts.mean() if counts.size else 0.0
    return float(counts.var() / mean) if mean > 0 else math.nan


def visits(trace: Trace, gap_s: float = VISIT_GAP_S) -> list[Visit]:
    """Visits of all cameras, ordered by start time."""
    by_camera: dict[str, list[float]] = defaultdict(list)
    for a in trace.arrivals:
        by_camera[a.camera].append(a.t)
    out: list[Visit] = []
    for camera, times in by_camera.items():
        out.extend(Visit(camera, tuple(run)) for run in split_runs(times, gap_s))
    out.sort(key=lambda v: (v.start, v.camera))
    return out


def split_runs(times: list[float] | tuple[float, ...], gap_s: float) -> list[list[float]]:
    """Split sorted times wherever consecutive times are more than ``gap_s`` apart."""
    runs: list[list[float]] = []
    for t in times:
        if runs and t - runs[-1][-1] <= gap_s:
            runs[-1].append(t)
        else:
            runs.append([t])
    return runs


def triggers(visit: Visit, burst_gap_s: float = BURST_GAP_S) -> list[list[float]]:
    """The bursts of one visit (image times per trigger)."""
    return split_runs(visit.times, burst_gap_s)


def images_per_visit(vs: list[Visit]) -> np.ndarray:
    return np.array([len(v) for v in vs], dtype=np.int64)


def within_visit_gaps(vs: list[Visit]) -> np.ndarray:
    """Gaps between consecutive images of the same visit, in seconds."""
    gaps = [np.diff(v.times) for v in vs if len(v) > 1]
    return np.concatenate(gaps) if gaps else np.zeros(0)


def time_of_day_histogram(trace: Trace) -> np.ndarray:
    """Images per hour of the local day (24 bins); without ``t0``, hours since the start."""
    times = np.asarray(trace.times(), dtype=float) + trace.clock_offset_s
    hours = ((times // 3600) % 24).astype(np.int64)
    return np.bincount(hours, minlength=24)


@dataclass(frozen=True)
class TraceSummary:
    """The headline numbers of one trace (what ``edgeprune trace show`` prints)."""

    name: str
    images: int
    cameras: int
    duration_s: float
    images_per_hour: float
    dispersion_per_minute: float
    active_minutes_fraction: float
    max_per_minute: int
    visits: int
    visit_gap_s: float
    images_per_visit_median: float
    images_per_visit_mean: float
    images_per_visit_max: int
    images_per_trigger_median: float
    gap_within_visit_median_s: float
    busiest_hour_of_day: int | None

    def to_dict(self) -> dict[str, Any]:
        return {
            k: (None if isinstance(v, float) and math.isnan(v) else v)
            for k, v in asdict(self).items()
        }


def summarize(
    trace: Trace, visit_gap_s: float = VISIT_GAP_S, burst_gap_s: float = BURST_GAP_S
) -> TraceSummary:
    """Compute :class:`TraceSummary` for ``trace``."""
    counts = per_minute_counts(trace)
    vs = visits(trace, visit_gap_s)
    ipv = images_per_visit(vs)
    per_trigger = [len(b) for v in vs for b in triggers(v, burst_gap_s)]
    gaps = within_visit_gaps(vs)
    tod = time_of_day_histogram(trace)
    nan = math.nan
    return TraceSummary(
        name=trace.name,
        images=len(trace),
        cameras=len(trace.cameras),
        duration_s=trace.span_s,
        images_per_hour=len(trace) / (trace.span_s / 3600) if trace.span_s > 0 else nan,
        dispersion_per_minute=index_of_dispersion(counts),
        active_minutes_fraction=float(np.mean(counts > 0)),
        max_per_minute=int(counts.max()) if counts.size else 0,
        visits=len(vs),
        visit_gap_s=visit_gap_s,
        images_per_visit_median=float(np.median(ipv)) if ipv.size else nan,
        images_per_visit_mean=float(ipv.mean()) if ipv.size else nan,
        images_per_visit_max=int(ipv.max()) if ipv.size else 0,
        images_per_trigger_median=float(np.median(per_trigger)) if per_trigger else nan,
        gap_within_visit_median_s=float(np.median(gaps)) if gaps.size else nan,
        busiest_hour_of_day=int(np.argmax(tod)) if len(trace) else None,
    )
