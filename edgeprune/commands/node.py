"""`edgeprune node`: run one slice of the model as an MQTT service (a device of the pipeline)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from edgeprune.commands._common import (
    add_checkpoint,
    add_mqtt,
    mqtt_settings,
    pipe_name,
    run_service,
)

log = logging.getLogger("edgeprune.node")


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "node",
        help="run one slice of the model as an MQTT service",
        description="A slice node: subscribes to edgeprune/<pipe>/stage/<i> (stage 0: "
        "stage/0/+, every camera), runs blocks "
        "[start, end) of the model at the level retained on control/stage/<i>, and publishes "
        "to stage/<i+1> (or, as the last stage, to results and exits). Without --stage and "
        "--start/--end it waits for the retained plan (control/plan) and finds itself by "
        "--node-id. All pruning levels are built once at start-up; switching is O(1).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--node-id",
        required=False,
        default=None,
        help="node name (topic level); default: <id> of a node-<id> MQTT user, or --config's",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="TOML file with [node], [mqtt], [emulation] tables",
    )
    parser.add_argument("--stage", type=int, default=None, help="stage index this node serves")
    parser.add_argument("--start", type=int, default=None, help="first block of the slice")
    parser.add_argument("--end", type=int, default=None, help="end block (exclusive)")
    add_checkpoint(parser)
    parser.add_argument(
        "--ratios", default=None, help="pruning levels as ratios (default 0,0.1,0.2,0.3,0.4,0.5)"
    )
    parser.add_argument(
        "--float16",
        action="store_true",
        default=None,
        help="send activations as float16 (half the bytes)",
    )
    parser.add_argument(
        "--queue-size",
        type=int,
        default=None,
        help="local queue bound; beyond it requests are shed and reported (default 512)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default 1)")
    parser.add_argument(
        "--max-payload-bytes",
        type=int,
        default=None,
        help="reject stage messages larger than this, reported on errors (default 16 MiB - "
        "64 KiB: below the broker's max_packet_size, which disconnects the sender instead)",
    )
    parser.add_argument(
        "--metrics-interval",
        type=float,
        default=None,
        help="seconds between metrics messages (default 1)",
    )
    parser.add_argument(
        "--no-bn-recalibrate",
        action="store_true",
        help="keep the stored BatchNorm statistics at every level",
    )
    g = parser.add_argument_group("device emulation (run the real work, then wait (k-1) x it)")
    g.add_argument("--slowdown", type=float, default=None, help="constant slowdown factor k >= 1")
    g.add_argument(
        "--slow-window",
        action="append",
        default=[],
        metavar="START:END:K",
        help="transient slowdown: factor K from START to END seconds (repeatable)",
    )
    g.add_argument(
        "--clock-start",
        type=float,
        default=None,
        help="epoch seconds the slowdown schedule counts from (default: start-up)",
    )
    add_mqtt(parser)
    parser.set_defaults(func=run)


def build_config(args: argparse.Namespace):  # -> NodeConfig
    from broker.security import node_id_for
    from nodes.config import NodeConfig
    from nodes.emulation import Emulation
    from pipeline.errors import ConfigError
    from pipeline.placement import SliceBounds

    overrides: dict = {
        "node_id": args.node_id,
        "checkpoint": args.checkpoint,
        "float16": args.float16,
        "queue_size": args.queue_size,
        "threads": args.threads,
        "max_payload_bytes": args.max_payload_bytes,
        "metrics_interval_s": args.metrics_interval,
        "clock_start": args.clock_start,
    }
    if args.pipe or not args.config:
        overrides["pipe"] = pipe_name(args)
    if (
        any(v is not None for v in (args.host, args.port, args.username, args.tls_ca))
        or not args.config
    ):
        overrides["mqtt"] = mqtt_settings(args)
    if args.ratios:
        overrides["ratios"] = tuple(float(r) for r in args.ratios.split(","))
    if args.no_bn_recalibrate:
        overrides["recalibrate_bn"] = False
    if args.stage is not None or args.start is not None or args.end is not None:
        if None in (args.stage, args.start, args.end):
            raise ConfigError("--stage, --start and --end go together")
        overrides["stage"] = args.stage
        overrides["bounds"] = SliceBounds(args.start, args.end)
    if args.slowdown is not None or args.slow_window:
        overrides["emulation"] = Emulation.parse(args.slowdown or 1.0, args.slow_window)
    if args.config:
        config = NodeConfig.from_toml(args.config, **overrides)
    else:
        overrides["node_id"] = node_id_for(overrides["mqtt"].username, args.node_id)
        config = NodeConfig(**{k: v for k, v in overrides.items() if v is not None})
    node_id_for(config.mqtt.username, config.node_id)  # the secure broker's ACL must agree
    return config


def run(args: argparse.Namespace) -> int:
    from nodes.node import SliceNode

    config = build_config(args)
    node = SliceNode(config)
    if config.emulation.active:
        log.info("emulating a slower device: %s", config.emulation.describe())
    return run_service(node.run)
