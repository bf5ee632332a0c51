"""`edgeprune tap`: print every message of a pipeline, the binary stage messages decoded too."""

from __future__ import annotations

import argparse
import sys

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


def topic_filters(base: str, given: list[str] | None) -> list[str]:
    """Absolute MQTT filters: ``base/#`` by default, relative filters joined to ``base``."""
    if not given:
        return [f"{base}/#"]
    root = base.split("/", 1)[0] + "/"
    return [f if f.startswith(root) else f"{base}/{f.lstrip('/')}" for f in given]


def run(args: argparse.Namespace) -> int:
    import asyncio
    import contextlib

    import aiomqtt

    from bus.topics import Topics
    from nodes.tap import describe, format_line, json_line
    from pipeline.errors import BrokerError

    settings = mqtt_settings(args)
    topics = Topics(pipe_name(args))
    filters = topic_filters(topics.base, args.topic)
    render = json_line if args.json else format_line
    seen = 0

    async def listen() -> None:
        nonlocal seen
        async with aiomqtt.Client(**settings.aiomqtt_kwargs()) as client:
            for f in filters:
                await client.subscribe(f, qos=1)
            print(f"tap: {settings.url} {' '.join(filters)}", file=sys.stderr, flush=True)
            async for message in client.messages:
                payload = (
                    message.payload
                    if isinstance(message.payload, bytes | bytearray)
                    else str(message.payload or "").encode()
                )
                rec = describe(str(message.topic), payload, retained=bool(message.retain))
                sys.stdout.write(render(rec) + "\n")
                sys.stdout.flush()
                seen += 1
                if args.count is not None and seen >= args.count:
                    return

    async def main(stop: asyncio.Event) -> None:
        task = asyncio.create_task(listen())
        stopper = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait(
                [task, stopper], timeout=args.timeout, return_when=asyncio.FIRST_COMPLETED
            )
            if task.done():
                try:
                    task.result()
                except aiomqtt.MqttError as exc:
                    raise BrokerError(f"tap: broker {settings.url}: {exc}") from exc
        finally:
            for t in (task, stopper):
                t.cancel()
            await asyncio.gather(task, stopper, return_exceptions=True)

    try:
        run_service(main)
    except BrokenPipeError:  # `edgeprune tap | head`
        with contextlib.suppress(OSError):
            sys.stdout.close()
        return 0
    return 1 if args.count is not None and seen < args.count else 0
