"""`edgeprune health`: the containers' health check (exit 0 healthy, 1 not)."""

from __future__ import annotations

import argparse
import os
import sys

from edgeprune.commands._common import add_mqtt, mqtt_settings, pipe_name


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "health",
        help="exit 0 if the broker accepts the login and the node (if any) says it is online",
        description="The health check of docker-compose.yml: exits 0 when the broker accepts "
        "the login of the EDGEPRUNE_MQTT_* settings and, with a node id, when the node's "
        "retained status (edgeprune/<pipe>/nodes/<node>/status) says online; 1 otherwise.",
    )
    parser.add_argument(
        "--node-id",
        default=None,
        help="the slice node to check (default: $EDGEPRUNE_NODE_ID; none: the login only)",
    )
    parser.add_argument(
        "--wait",
        type=float,
        default=4.0,
        metavar="SECONDS",
        help="how long to wait for the retained status (default 4)",
    )
    add_mqtt(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import asyncio

    from bus.health import is_healthy
    from bus.topics import Topics
    from pipeline.errors import EdgepruneError

    node = args.node_id or os.environ.get("EDGEPRUNE_NODE_ID") or None
    try:
        healthy = asyncio.run(
            is_healthy(mqtt_settings(args), Topics(pipe_name(args)), node, args.wait)
        )
    except EdgepruneError as exc:  # a bad setting: unhealthy (Docker reserves exit code 2)
        print(f"edgeprune health: {exc}", file=sys.stderr)
        return 1
    return 0 if healthy else 1
