"""Reading the project's JSON files (profiles, plans, calibrations, measurements, schedules)
with one rule: a file that cannot be read or parsed is a :class:`~pipeline.errors.ConfigError`
naming what it was meant to be."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError


def read_json(path: str | Path, what: str) -> Any:
    """The parsed contents of ``path``, a ``what`` (e.g. ``"calibration"``).

    Raises:
        ConfigError: the file cannot be read or is not JSON.
    """
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc}") from exc
