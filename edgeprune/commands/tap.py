"""`edgeprune tap`: print every message of a pipeline, the binary stage messages decoded too."""

from __future__ import annotations

import argparse
import sys

from bus.topics import Topics
from edgeprune.commands._common import add_mqtt, mqtt_settings, pipe_name, run_service


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "tap",
        help="print every message of a pipeline, one line each (stage messages decoded)",
        description="Subscribes to edgeprune/<pipe>/# (or the --topic filters) and prints one "
        "line per message: the msgpack stage messages decoded (request id, camera, stage, hops "
        "so far with node, level, queue+compute time, and the tensor's dtype, shape, kept/full "
        "channels and bytes, or the image's format and bytes) and the JSON topics compactly. "
        "A payload that does not decode is shown with the codec's reason. Like "
        "`mosquitto_sub -v -t 'edgeprune/<pipe>/#'`, but readable. Ctrl-C quits.",
    )
    parser.add_argument(
        "--topic",
        action="append",
        default=None,
        metavar="FILTER",
        help="MQTT topic filter, relative to edgeprune/<pipe>/ (e.g. 'stage/#', "
        "'errors/#', 'nodes/+/metrics') or absolute; repeatable "
        "(default: everything of the pipe)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object per message instead of a line of text",
    )
    parser.add_argument(
        "--count", type=_positive_int, default=None, metavar="N", help="exit after N messages"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="exit after SECONDS; exit code 1 if --count was not reached",
    )
    add_mqtt(parser)
    parser.set_defaults(func=run)


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def topic_filters(topics: Topics, given: list[str] | None) -> list[str]:
    """Absolute MQTT filters: everything of the pipe by default, relative filters joined to
    the pipe's base."""
    if not given:
        return [topics.everything]
    return [topics.absolute_filter(f) for f in given]


def run(args: argparse.Namespace) -> int:
    import contextlib

    from bus.observer import Observed, Observer
    from nodes.tap import describe, format_line, json_line

    settings = mqtt_settings(args)
    filters = topic_filters(Topics(pipe_name(args)), args.topic)
    render = json_line if args.json else format_line

    def show(message: Observed) -> None:
        record = describe(message.topic, message.payload, retained=message.retained, ts=message.rx)
        sys.stdout.write(render(record) + "\n")
        sys.stdout.flush()

    def announce() -> None:
        print(f"tap: {settings.url} {' '.join(filters)}", file=sys.stderr, flush=True)

    observer = Observer(settings, [(f, 1) for f in filters], show)
    try:
        run_service(
            lambda stop: observer.watch(
                stop, count=args.count, timeout=args.timeout, on_ready=announce
            )
        )
    except BrokenPipeError:  # `edgeprune tap | head`
        with contextlib.suppress(OSError):
            sys.stdout.close()
        return 0
    return 1 if args.count is not None and observer.seen < args.count else 0
