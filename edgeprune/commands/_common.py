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
    value = getattr(args, "data_dir", None) or os.environ.get("EDGEPRUNE_DATA_DIR") or DEFAULT_DATA_DIR
    return Path(value)


def add_data_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", default=None,
                        help="dataset cache folder (default: $EDGEPRUNE_DATA_DIR or ./data)")


def add_checkpoint(parser: argparse.ArgumentParser, *, multiple: bool = False) -> None:
    from pipeline.checkpoint import DEFAULT_CHECKPOINT

    if multiple:
        parser.add_argument("checkpoints", nargs="*", type=Path,
                            help=f"checkpoints to compare (default: {DEFAULT_CHECKPOINT.name})")
    else:
        parser.add_argument("--checkpoint", type=Path, default=None,
                            help=f"model checkpoint (default: models/{DEFAULT_CHECKPOINT.name})")


def add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object on stdout instead of a table")


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
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    line = "  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join([line, sep, *body])


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)
