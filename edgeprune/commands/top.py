"""`edgeprune top`: a live terminal view of nodes, levels, queues, latency and SLO attainment."""

from __future__ import annotations

import argparse
import sys

from edgeprune.commands._common import add_mqtt, mqtt_settings, pipe_name, run_service


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "top",
        help="live view of a running pipeline",
        description="Subscribes to edgeprune/<pipe>/# and redraws, once a second, every node "
        "(state, stage, level, queue depth, service time, counters, emulated slowdown), the "
        "end-to-end latency percentiles and SLO attainment of the last 500 requests, live "
        "accuracy, the last controller decision and the last error. Ctrl-C quits.",
    )
    parser.add_argument(
        "--slo-ms", type=float, default=None, help="show SLO attainment against this latency"
    )
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between redraws")
    parser.add_argument(
        "--once",
        type=float,
        default=None,
        metavar="SECONDS",
        help="collect for SECONDS, print one screen and exit (for scripts)",
    )
    add_mqtt(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bus.topics import Topics
    from nodes.top import PipelineView, show

    topics = Topics(pipe_name(args))
    view = PipelineView(topics.pipe, slo_s=args.slo_ms / 1e3 if args.slo_ms else None)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    return run_service(
        lambda stop: show(
            mqtt_settings(args),
            view,
            write,
            stop,
            interval_s=args.interval,
            once_s=args.once,
            clear=sys.stdout.isatty() and args.once is None,
        )
    )
