"""`edgeprune broker`: run a local Mosquitto in the foreground until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from edgeprune.broker import DEFAULT_MAX_PACKET_SIZE, DEV_CONFIG, MosquittoBroker
from pipeline.errors import BrokerError, ConfigError

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``broker`` subcommand to the CLI."""
    parser = sub.add_parser(
        "broker",
        help="run a local Mosquitto (development config) in the foreground",
        description=(
            f"Start Mosquitto from {DEV_CONFIG.name} (rendered into a run directory with the "
            "chosen port and limits), wait until it answers MQTT, and keep it running until "
            "Ctrl-C or SIGTERM. Anonymous and unencrypted: for one machine or a trusted LAN."
        ),
    )
    parser.add_argument(
        "--port",
        type=int,
        default=1883,
        help="TCP port to listen on; 0 picks a free one (default 1883)",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1, loopback only)",
    )
    parser.add_argument(
        "--run-dir",
        type=Path,
        default=None,
        help="directory for the rendered config, the log and the database; "
        "default a temporary directory removed on exit",
    )
    parser.add_argument(
        "--max-packet-size",
        type=int,
        default=DEFAULT_MAX_PACKET_SIZE,
        metavar="BYTES",
        help=f"largest MQTT packet a client may send (default {DEFAULT_MAX_PACKET_SIZE})",
    )
    parser.add_argument(
        "--persistence",
        action="store_true",
        help="keep retained messages in the run directory across restarts",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the rendered config and exit without starting the broker",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the broker until SIGINT or SIGTERM; returns 0 on a clean stop.

    Raises:
        ConfigError: a bad port or packet size.
        BrokerError: mosquitto cannot start, or exits on its own while running.
    """
    if not 0 <= args.port < 65536:
        raise ConfigError(f"--port must be in 0..65535, got {args.port}")
    if args.max_packet_size < 64:
        raise ConfigError(
            f"--max-packet-size must be at least 64 bytes, got {args.max_packet_size}"
        )
    broker = MosquittoBroker(
        port=args.port or None,
        host=args.host,
        run_dir=args.run_dir,
        max_packet_size=args.max_packet_size,
        persistence=args.persistence,
    )
    if args.print_config:
        sys.stdout.write(broker.render())
        return 0

    stop_requested = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        stop_requested.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        broker.start()
        try:
            print(
                f"Mosquitto listening on {broker.url} "
                f"(config: {broker.config_path}, log: {broker.log_path})",
                flush=True,
            )
            print(
                f"  watch the pipeline: mosquitto_sub -h {broker.host} -p {broker.port} "
                "-v -t 'edgeprune/#'",
                flush=True,
            )
            print("  stop with Ctrl-C", flush=True)
            # Wake up on a signal at once; otherwise check every half second that
            # mosquitto is still alive.
            while not stop_requested.wait(0.5):
                if not broker.running:
                    raise BrokerError(
                        f"mosquitto on {broker.url} exited on its own; log:\n{broker.log_tail()}"
                    )
            logger.info("received %s, stopping mosquitto", signal.Signals(received[0]).name)
        finally:
            broker.stop()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
