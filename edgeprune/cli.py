"""The ``edgeprune`` command line.

Every subcommand lives in its own module under ``edgeprune.commands`` and exposes
``register(subparsers)``, which adds its parser and sets ``func`` (called with the parsed
namespace, returning an exit code). Only this module configures logging and reads environment
variables.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import time
from collections.abc import Sequence

from edgeprune import __version__
from pipeline.errors import EdgepruneError

# Order is the order shown by --help.
COMMAND_MODULES = [
    "data",
    "train",
    "prune_curve",
    "profile",
    "partition",
    "calibrate",
    "plan",
    "broker",
    "node",
    "multiview",
    "camera",
    "controller",
    "tap",
    "top",
    "health",
    "trace",
    "experiment",
    "demo",
    "bench",
]

ENV_PREFIX = "EDGEPRUNE_"


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line, for log shippers; carries ``request_id`` when a record has it."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(record.created, 6),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in ("request_id", "node", "stage", "pipe"):
            if hasattr(record, key):
                out[key] = getattr(record, key)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def configure_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonLogFormatter())
    else:
        formatter = logging.Formatter(
            "%(asctime)s.%(msecs)03d %(levelname)-5s %(name)s: %(message)s", datefmt="%H:%M:%S"
        )
        formatter.converter = time.localtime
        handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("matplotlib", "PIL", "torch_pruning"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgeprune",
        description=(
            "Run-time, environment-aware pruning for a CNN split across small edge devices that "
            "talk over MQTT. Start with `edgeprune demo`; every subcommand has its own --help."
        ),
        epilog=(
            f"Environment: {ENV_PREFIX}LOG_LEVEL, {ENV_PREFIX}LOG_FORMAT, {ENV_PREFIX}DATA_DIR "
            "(dataset cache), and the MQTT options' EDGEPRUNE_MQTT_* forms (see `edgeprune node "
            "--help`)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"edgeprune {__version__}")
    parser.add_argument(
        "--log-level",
        default=os.environ.get(ENV_PREFIX + "LOG_LEVEL", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        type=str.upper,
        help="log verbosity (default INFO)",
    )
    parser.add_argument(
        "--log-format",
        default=os.environ.get(ENV_PREFIX + "LOG_FORMAT", "text"),
        choices=["text", "json"],
        help="text for people, json for log shippers",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"edgeprune.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"edgeprune.commands.{name}":
                continue  # command not built yet
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    configure_logging(args.log_level, args.log_format)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except EdgepruneError as exc:
        print(f"edgeprune {args.command}: error: {exc}", file=sys.stderr)
        return 2
