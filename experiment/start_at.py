"""Run an ``edgeprune`` command at a given wall-clock instant, its imports done beforehand.

Starting a Python process that imports torch takes several seconds on a busy two-core machine,
and that time varies. The experiment harness needs the camera's replay to start at the shared
clock start (so that node slowdown windows line up with the trace), so it launches the camera
early through this wrapper::

    python -m experiment.start_at --at 1700000000.0 -- camera --trace ... --json

The wrapper builds the full command-line parser (which imports every command module), imports
the modules the camera needs, waits until ``--at`` and only then runs the command: the
remaining start-up (loading the images, connecting) takes a fraction of a second.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections.abc import Sequence

_PRELOAD = (
    "nodes.camera",
    "nodes.schedule",
    "nodes.journal",
    "pipeline.data",
    "traces.format",
    "traces.replay",
    "PIL.Image",
    "bus.session",  # and the MQTT client under it
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiment.start_at",
        description="Run `edgeprune ARGS...` at the epoch time --at (imports done first).",
    )
    parser.add_argument("--at", type=float, required=True, help="epoch seconds to start at")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="-- then the edgeprune arguments")
    ns = parser.parse_args(argv)
    args = ns.args[1:] if ns.args[:1] == ["--"] else ns.args
    if not args:
        parser.error("give the edgeprune arguments after --")
    from edgeprune import cli

    cli.build_parser()  # imports every command module
    for name in _PRELOAD:
        importlib.import_module(name)
    delay = ns.at - time.time()
    if delay > 0:
        time.sleep(delay)  # a deadline, not synchronisation: the whole point of this wrapper
    return cli.main(args)


if __name__ == "__main__":
    sys.exit(main())
