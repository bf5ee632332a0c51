"""Options and helpers shared by several subcommands (the CLI is the only place that reads the
environment)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

DEFAULT_DATA_DIR = "data"


def data_dir(args: argparse.Namespace) -> Path:
    value = (
        getattr(args, "data_dir", None) or os.environ.get("EDGEPRUNE_DATA_DIR") or DEFAULT_DATA_DIR
    )
    return Path(value)


def add_data_dir(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, *, help: str = "dataset cache folder"
) -> None:
    parser.add_argument(
        "--data-dir", default=None, help=f"{help} (default: $EDGEPRUNE_DATA_DIR or ./data)"
    )


def add_checkpoint(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    *,
    multiple: bool = False,
    help: str = "model checkpoint",
) -> None:
    # the default is pipeline.checkpoint.DEFAULT_CHECKPOINT; not imported here (torch) so that
    # --help stays fast
    if multiple:
        parser.add_argument(
            "checkpoints",
            nargs="*",
            type=Path,
            help="checkpoints to compare (default: models/resnet-s.pt)",
        )
    else:
        parser.add_argument(
            "--checkpoint", type=Path, default=None, help=f"{help} (default: models/resnet-s.pt)"
        )


def add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object on stdout instead of a table"
    )


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=None, default=_json_default)
    sys.stdout.write("\n")
    sys.stdout.flush()


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def format_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A plain aligned text table."""
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)
    ]
    line = "  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join([line, sep, *body])


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def add_mqtt(parser: argparse.ArgumentParser) -> None:
    """Broker options; each also reads EDGEPRUNE_MQTT_<NAME> from the environment."""
    g = parser.add_argument_group("broker (each option also reads EDGEPRUNE_MQTT_<NAME>)")
    g.add_argument("--host", default=None, help="broker host (default 127.0.0.1)")
    g.add_argument("--port", type=int, default=None, help="broker port (default 1883)")
    g.add_argument("--username", default=None, help="MQTT user name")
    g.add_argument("--password", default=None, help="MQTT password (prefer the env variable)")
    g.add_argument("--tls-ca", type=Path, default=None, help="CA certificate: enables TLS")
    g.add_argument("--tls-cert", type=Path, default=None, help="client certificate")
    g.add_argument("--tls-key", type=Path, default=None, help="client key")
    g.add_argument(
        "--tls-insecure",
        action="store_true",
        default=None,
        help="do not verify the broker's host name",
    )
    g.add_argument(
        "--pipe",
        default=None,
        help="pipeline name: topics are edgeprune/<pipe>/... (default 'default')",
    )


def _env(name: str) -> str | None:
    return os.environ.get(f"EDGEPRUNE_MQTT_{name.upper()}")


def mqtt_settings(args: argparse.Namespace) -> Any:
    from bus.connection import MqttSettings

    def pick(name: str, cast: Any = str) -> Any:
        value = getattr(args, name, None)
        if value is None:
            env = _env(name)
            value = cast(env) if env is not None else None
        return value

    kwargs: dict[str, Any] = {}
    for name, cast in (
        ("host", str),
        ("port", int),
        ("username", str),
        ("password", str),
        ("tls_ca", Path),
        ("tls_cert", Path),
        ("tls_key", Path),
    ):
        value = pick(name, cast)
        if value is not None:
            kwargs[name] = value
    insecure = pick("tls_insecure", lambda v: v.lower() in ("1", "true", "yes"))
    if insecure:
        kwargs["tls_insecure"] = True
    return MqttSettings(**kwargs)


def pipe_name(args: argparse.Namespace) -> str:
    return (
        getattr(args, "pipe", None) or _env("pipe") or os.environ.get("EDGEPRUNE_PIPE") or "default"
    )


def run_service(coro_factory: Any) -> int:
    """Run an asyncio service until SIGINT/SIGTERM; the factory takes the stop event."""
    import asyncio
    import signal

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await coro_factory(stop)

    asyncio.run(main())
    return 0
