"""`edgeprune camera`: publish images to stage 0 at a fixed rate or at a trace's times."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
from pathlib import Path

from edgeprune.commands._common import (
    add_data_dir,
    add_json,
    add_mqtt,
    data_dir,
    format_table,
    mqtt_settings,
    pipe_name,
    print_json,
)

log = logging.getLogger("edgeprune.camera")


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "camera",
        help="publish images to stage 0 (fixed rate or trace replay)",
        description="An IoT camera: publishes images (PNG by default) to its topic, "
        "stage/0/<camera> of the pipe, from the dataset's test split or a folder, at a "
        "fixed rate or at the times of a camera-trap trace (time compression allowed). Each message "
        "carries a request id, the camera id, the capture time and the true label when known. "
        "Every image is journaled until its result is seen, re-sent after --resend-after "
        "seconds, and results are de-duplicated by request id. Prints a summary at the end.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    src = parser.add_argument_group("images")
    src.add_argument(
        "--dataset",
        default="animal-mnist",
        help="animal-mnist (test split) or a folder (class sub-folders or images)",
    )
    src.add_argument("--split", default="test", choices=["train", "val", "test"])
    add_data_dir(parser)
    src.add_argument(
        "--format", default="png", choices=["png", "jpeg", "raw"], help="image encoding on the wire"
    )
    sched = parser.add_argument_group("schedule (fixed rate unless --trace)")
    sched.add_argument("--rate", type=float, default=5.0, help="images per second")
    sched.add_argument("--count", type=int, default=100, help="images to send at --rate")
    sched.add_argument("--cameras", type=int, default=1, help="camera ids at --rate")
    sched.add_argument(
        "--camera-id",
        default=None,
        help="publish every image as this one camera, whatever the schedule says (default: "
        "<id> of a camera-<id> MQTT user, which may publish only as that camera)",
    )
    sched.add_argument(
        "--trace",
        action="append",
        default=[],
        help="trace name (e.g. dsail_porini) or CSV path; repeat to merge",
    )
    sched.add_argument(
        "--compression",
        type=float,
        default=1.0,
        help="trace time compression (10: ten times faster)",
    )
    sched.add_argument(
        "--max-idle",
        type=float,
        default=None,
        help="cap idle gaps in the trace to this many seconds (before compression)",
    )
    sched.add_argument("--window", default=None, help="trace window START:END in seconds")
    sched.add_argument("--max-images", type=int, default=None, help="stop after N images")
    sched.add_argument("--seed", type=int, default=0)
    rel = parser.add_argument_group("delivery")
    rel.add_argument(
        "--journal", type=Path, default=None, help="SQLite journal file (default: in memory)"
    )
    rel.add_argument(
        "--resend-after",
        type=float,
        default=10.0,
        help="re-send a request whose result has not come back after S seconds (0: never)",
    )
    rel.add_argument(
        "--drain",
        type=float,
        default=30.0,
        help="wait up to S seconds for outstanding results at the end",
    )
    rel.add_argument(
        "--no-track", action="store_true", help="fire and forget: do not subscribe to results"
    )
    add_mqtt(parser)
    add_json(parser)
    parser.set_defaults(func=run)


def build_shots(args: argparse.Namespace, labels, n_images: int):  # -> list[Shot]
    from nodes.camera import rate_schedule
    from pipeline.errors import ConfigError

    if args.trace:
        from nodes.schedule import trace_shots
        from traces.format import load_traces

        window = None
        if args.window:
            try:
                a, b = (float(v) for v in args.window.split(":"))
            except ValueError as exc:
                raise ConfigError(f"--window must be START:END, got {args.window!r}") from exc
            window = (a, b)
        return trace_shots(
            load_traces(args.trace),
            labels,
            compression=args.compression,
            max_idle_s=args.max_idle,
            window=window,
            max_images=args.max_images,
            n_images=n_images,
            seed=args.seed,
        )
    if args.rate <= 0 or args.count < 0:
        raise ConfigError("--rate must be > 0 and --count >= 0")
    return rate_schedule(
        args.rate,
        args.count,
        [f"cam{i}" for i in range(args.cameras)],
        n_images=n_images,
        seed=args.seed,
    )


def run(args: argparse.Namespace) -> int:
    from broker.security import camera_id_for
    from edgeprune.commands._common import run_service
    from nodes.camera import Camera, load_source
    from nodes.journal import RequestJournal

    mqtt = mqtt_settings(args)
    camera_id = camera_id_for(mqtt.username, args.camera_id)
    source = load_source(args.dataset, data_dir(args), args.split)
    shots = build_shots(args, source.labels, len(source))
    if camera_id is not None:
        shots = [dataclasses.replace(s, camera=camera_id) for s in shots]
        log.info("camera: every image is published as camera %s", camera_id)
    log.info("camera: %d images over %.1f s", len(shots), shots[-1].at_s if shots else 0.0)
    journal = RequestJournal(args.journal or ":memory:")
    camera = Camera(
        mqtt,
        pipe_name(args),
        source,
        shots,
        image_format=args.format,
        journal=journal,
        resend_after_s=args.resend_after or None,
        drain_s=args.drain,
        track_results=not args.no_track,
    )
    result: dict = {}

    async def go(stop: asyncio.Event) -> None:
        report = await camera.run(stop)
        result.update(report.summary())

    run_service(go)
    journal.close()
    if args.json:
        print_json(result)
    else:
        print(format_table(list(result), [list(result.values())]))
    return 0 if result.get("lost", 0) == 0 else 1
