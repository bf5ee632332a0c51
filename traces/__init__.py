"""Camera-trap arrival traces: the file format and shipped real traces, statistics, a fitted
synthetic arrival model, and replay schedules. Needs numpy and scipy; :mod:`traces.plot`
(matplotlib) is imported only when plotting.
"""

from traces.convert import convert_raw
from traces.format import (
    Arrival,
    Trace,
    available_traces,
    default_trace_path,
    load_trace,
    load_traces,
    parse_trace,
    resolve_trace,
    save_trace,
)
from traces.model import TraceModel, fit_model, generate, load_model, save_model
from traces.replay import ScheduledArrival, replay_schedule
from traces.stats import (
    TraceSummary,
    Visit,
    index_of_dispersion,
    per_minute_counts,
    summarize,
    time_of_day_histogram,
    visits,
    within_visit_gaps,
)

__all__ = [
    "Arrival",
    "ScheduledArrival",
    "Trace",
    "TraceModel",
    "TraceSummary",
    "Visit",
    "available_traces",
    "convert_raw",
    "default_trace_path",
    "fit_model",
    "generate",
    "index_of_dispersion",
    "load_model",
    "load_trace",
    "load_traces",
    "parse_trace",
    "per_minute_counts",
    "replay_schedule",
    "resolve_trace",
    "save_model",
    "save_trace",
    "summarize",
    "time_of_day_histogram",
    "visits",
    "within_visit_gaps",
]
