"""`edgeprune trace show|fit|generate|convert`: camera-trap arrival traces.

Traces are given as a file path or as the name of a shipped trace (``dsail_porini``,
``orinoquia_day1``). Durations accept a unit: ``90s``, ``15m``, ``1h``, ``2d`` (plain numbers
are seconds).
"""

from __future__ import annotations

import argparse
import logging
import math
import re
from pathlib import Path
from typing import Any

from edgeprune.commands._common import add_json, format_table, print_json

log = logging.getLogger(__name__)

_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*$", re.I)


def parse_duration(text: str) -> float:
    """Seconds from ``"90"``, ``"90s"``, ``"15m"``, ``"1.5h"`` or ``"2d"``."""
    match = _DURATION_RE.match(text)
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"bad duration {text!r}: use e.g. 90s, 15m, 1h, 2d")
    seconds = float(match.group(1)) * _UNITS[unit]
    if not math.isfinite(seconds) or seconds <= 0:
        raise argparse.ArgumentTypeError(f"duration must be > 0, got {text!r}")
    return seconds


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "trace",
        help="camera-trap arrival traces: show, fit, generate, convert",
        description="Camera-trap arrival traces: summarise real or synthetic traces, fit the "
        "bursty arrival model to real ones, generate synthetic traces from it, and convert the "
        "raw public files into the trace format. A trace is a CSV path or a shipped name ("
        "dsail_porini, orinoquia_day1).",
    )
    tsub = parser.add_subparsers(dest="trace_cmd", metavar="ACTION")

    show = tsub.add_parser(
        "show",
        help="summary of one or more traces",
        description="Images, cameras, duration, per-minute dispersion "
        "(var/mean; Poisson = 1), visits and images per visit.",
    )
    show.add_argument("traces", nargs="+", metavar="TRACE", help="trace path or shipped name")
    show.add_argument(
        "--visit-gap",
        type=float,
        default=60.0,
        help="a gap longer than this (s) at one camera starts a new visit",
    )
    show.add_argument(
        "--plot", type=Path, default=None, help="also write a comparison PNG of the traces here"
    )
    add_json(show)
    show.set_defaults(func=_show)

    fit = tsub.add_parser(
        "fit",
        help="fit the arrival model to real traces",
        description="Fit the bursty arrival model (hourly visit rates, "
        "triggers per visit, images per trigger, re-trigger gaps) to one or "
        "more traces, pooled, and write it as JSON.",
    )
    fit.add_argument("traces", nargs="+", metavar="TRACE", help="trace path or shipped name")
    fit.add_argument("--out", type=Path, required=True, help="model JSON to write")
    fit.add_argument(
        "--triggers",
        choices=["kde", "lognormal"],
        default="kde",
        help="triggers-per-visit distribution (default kde; see traces.model)",
    )
    fit.add_argument("--visit-gap", type=float, default=60.0, help="visit split gap (s)")
    fit.add_argument("--burst-gap", type=float, default=1.5, help="trigger split gap (s)")
    add_json(fit)
    fit.set_defaults(func=_fit)

    gen = tsub.add_parser(
        "generate",
        help="generate a synthetic trace from a fitted model",
        description="Generate a synthetic trace (deterministic per seed) "
        "from a model written by `edgeprune trace fit`.",
    )
    gen.add_argument("--model", type=Path, required=True, help="model JSON from `trace fit`")
    gen.add_argument(
        "--duration", type=parse_duration, default=3600.0, help="length, e.g. 1h or 2d (default 1h)"
    )
    gen.add_argument("--cameras", type=int, default=1, help="number of cameras (default 1)")
    gen.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    gen.add_argument(
        "--start",
        default="2000-01-01T00:00:00",
        help="local start time, ISO-8601 (sets the time-of-day modulation)",
    )
    gen.add_argument(
        "--rate-scale",
        type=float,
        default=1.0,
        help="multiply the visit rate (busier than the real traces)",
    )
    gen.add_argument("--out", type=Path, required=True, help="trace CSV to write")
    gen.add_argument("--plot", type=Path, default=None, help="comparison PNG to write")
    gen.add_argument(
        "--real",
        action="append",
        default=[],
        metavar="TRACE",
        help="real trace to compare with in --plot (repeatable)",
    )
    gen.set_defaults(func=_generate)

    conv = tsub.add_parser(
        "convert",
        help="convert a raw public arrival file",
        description="Convert a raw arrival CSV (dsail: timestamp,camera,"
        "species,animals; orinoquia: timestamp,camera,sequence,frame) into "
        "the trace format. This is how traces/data was made.",
    )
    conv.add_argument("src", type=Path, help="raw CSV")
    conv.add_argument("--kind", choices=["dsail", "orinoquia"], required=True)
    conv.add_argument("--out", type=Path, required=True, help="trace CSV to write")
    conv.add_argument("--name", default=None, help="trace name (default: the kind's name)")
    conv.add_argument(
        "--classes",
        default=None,
        help="comma-separated class names: species found there get a label id",
    )
    conv.set_defaults(func=_convert)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])


def _summary_rows(summaries: list[Any]) -> list[list[Any]]:
    fields = [
        ("images", "images"),
        ("cameras", "cameras"),
        ("duration (h)", None),
        ("images per hour", "images_per_hour"),
        ("per-minute dispersion (var/mean)", "dispersion_per_minute"),
        ("active minutes", "active_minutes_fraction"),
        ("max images in a minute", "max_per_minute"),
        ("visits", "visits"),
        ("images/visit median", "images_per_visit_median"),
        ("images/visit mean", "images_per_visit_mean"),
        ("images/visit max", "images_per_visit_max"),
        ("images/trigger median", "images_per_trigger_median"),
        ("gap within visit median (s)", "gap_within_visit_median_s"),
        ("busiest hour of day", "busiest_hour_of_day"),
    ]
    rows = []
    for label, key in fields:
        if key is None:
            rows.append([label, *(s.duration_s / 3600 for s in summaries)])
        else:
            rows.append([label, *(getattr(s, key) for s in summaries)])
    return rows


def _show(args: argparse.Namespace) -> int:
    from traces.format import load_traces
    from traces.stats import summarize

    traces = load_traces(args.traces)
    summaries = [summarize(t, visit_gap_s=args.visit_gap) for t in traces]
    plot = None
    if args.plot:
        from traces.plot import plot_traces

        plot = plot_traces(traces, args.plot, visit_gap_s=args.visit_gap)
    if args.json:
        print_json(
            {
                "traces": [
                    {**s.to_dict(), "source": t.source, "t0": t.t0.isoformat() if t.t0 else None}
                    for s, t in zip(summaries, traces, strict=True)
                ],
                "plot": str(plot) if plot else None,
            }
        )
        return 0
    for t in traces:
        start = t.t0.isoformat() if t.t0 else "unknown"
        print(f"{t.name}: start {start}; source: {t.source or 'not stated'}")
    print(format_table(["", *(t.name for t in traces)], _summary_rows(summaries)))
    if plot:
        print(f"plot: {plot}")
    return 0


def _fit(args: argparse.Namespace) -> int:
    from traces.format import load_traces
    from traces.model import fit_model, save_model

    traces = load_traces(args.traces)
    model = fit_model(
        traces, visit_gap_s=args.visit_gap, burst_gap_s=args.burst_gap, triggers_model=args.triggers
    )
    path = save_model(model, args.out)
    if args.json:
        print_json(
            {
                "model": model.to_dict(),
                "out": str(path),
                "mean_images_per_visit": model.mean_images_per_visit(),
            }
        )
        return 0
    rates = model.hourly_visit_rate
    busy = sorted(range(24), key=lambda h: -rates[h])[:3]
    rows: list[list[Any]] = [
        ["fitted on", ", ".join(model.fitted_on)],
        ["visits / camera-hours observed", f"{model.n_visits} / {model.camera_hours:.0f}"],
        ["visits per camera-day", model.visits_per_camera_day],
        ["busiest hours (visits/camera-h)", ", ".join(f"{h:02d}h {rates[h]:.3g}" for h in busy)],
        [
            "triggers per visit",
            f"{model.triggers_model} (lognormal fit mu={model.triggers_mu:.2f} "
            f"sigma={model.triggers_sigma:.2f}), cap {model.max_triggers}",
        ],
        [
            "images per trigger",
            ", ".join(f"{k + 1}: {p:.2g}" for k, p in enumerate(model.images_per_trigger) if p),
        ],
        ["image spacing in a burst (s)", model.image_spacing_s],
        [
            "re-trigger gap median (s)",
            model.retrigger_gap_quantiles[len(model.retrigger_gap_quantiles) // 2],
        ],
        ["expected images per visit", model.mean_images_per_visit()],
    ]
    print(format_table(["parameter", "value"], rows))
    print(f"model written to {path}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from datetime import datetime

    from pipeline.errors import ConfigError
    from traces.format import load_traces, save_trace
    from traces.model import generate, load_model
    from traces.stats import summarize

    try:
        start = datetime.fromisoformat(args.start)
    except ValueError as exc:
        raise ConfigError(f"--start must be ISO-8601 local time, got {args.start!r}") from exc
    if args.cameras < 1:
        raise ConfigError("--cameras must be >= 1")
    model = load_model(args.model)
    trace = generate(
        model,
        args.duration,
        args.cameras,
        args.seed,
        t0=start,
        rate_scale=args.rate_scale,
        name=args.out.stem,
    )
    path = save_trace(trace, args.out)
    s = summarize(trace, visit_gap_s=model.visit_gap_s)
    print(
        f"{path}: {s.images} images from {s.cameras} of {args.cameras} cameras over "
        f"{args.duration / 3600:.3g} h; per-minute dispersion {s.dispersion_per_minute:.3g}, "
        f"{s.visits} visits, images per visit median {s.images_per_visit_median:.3g} mean "
        f"{s.images_per_visit_mean:.3g}"
    )
    if args.plot:
        from traces.plot import plot_traces

        real = load_traces(args.real)
        print(f"plot: {plot_traces([*real, trace], args.plot, visit_gap_s=model.visit_gap_s)}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from traces.convert import convert_raw
    from traces.format import save_trace

    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    trace = convert_raw(args.src, args.kind, name=args.name, classes=classes)
    path = save_trace(trace, args.out)
    labelled = sum(a.label is not None for a in trace.arrivals)
    print(f"{path}: {len(trace)} images, {len(trace.cameras)} cameras, {labelled} labelled")
    return 0
