"""`--log-format json`: one JSON object per line, with request ids when a record has them."""

from __future__ import annotations

import json
import logging

from edgeprune.cli import JsonLogFormatter


def test_json_lines_carry_structured_fields():
    record = logging.LogRecord(
        "nodes.node", logging.WARNING, __file__, 1, "rejected %s: %s", ("r-1", "bad shape"), None
    )
    record.request_id = "r-1"
    record.node = "n1"
    line = JsonLogFormatter().format(record)
    obj = json.loads(line)
    assert obj["msg"] == "rejected r-1: bad shape"
    assert obj["request_id"] == "r-1" and obj["node"] == "n1"
    assert obj["level"] == "WARNING" and obj["logger"] == "nodes.node"
    assert "\n" not in line
