"""`edgeprune top`: a live terminal view of nodes, levels, queues, latency and SLO attainment."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time

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
    import aiomqtt

    from bus.messages import decode_any
    from bus.topics import Topics
    from nodes.top import PipelineView
    from pipeline.errors import CodecError

    settings = mqtt_settings(args)
    topics = Topics(pipe_name(args))
    view = PipelineView(topics.pipe, slo_s=args.slo_ms / 1e3 if args.slo_ms else None)
    tty = sys.stdout.isatty() and args.once is None

    async def listen() -> None:
        async with aiomqtt.Client(**settings.aiomqtt_kwargs()) as client:
            await client.subscribe(topics.everything, qos=0)
            async for message in client.messages:
                topic = str(message.topic)
                if topic.startswith(f"{topics.base}/stage/"):
                    continue
                with contextlib.suppress(CodecError):
                    view.ingest(decode_any(bytes(message.payload)), time.time())  # type: ignore[arg-type]

    async def main(stop: asyncio.Event) -> None:
        task = asyncio.create_task(listen())
        try:
            if args.once is not None:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), args.once)
                if task.done() and task.exception():
                    raise task.exception()  # type: ignore[misc]
                print(view.render(time.time()))
                return
            while not stop.is_set():
                screen = view.render(time.time())
                sys.stdout.write(("\x1b[H\x1b[2J" if tty else "\n") + screen + "\n")
                sys.stdout.flush()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), args.interval)
                if task.done():
                    task.result()
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    return run_service(main)
