"""The live view's state and rendering, fed with decoded messages (no broker)."""

from __future__ import annotations

from bus.messages import (
    ErrorMessage,
    ExitMessage,
    MetricsMessage,
    ResultMessage,
    StatusMessage,
)
from nodes.top import PipelineView


def _exit(latency_s: float) -> ExitMessage:
    return ExitMessage("r", "cam", 0.0, 0.0, latency_s, latency_s, ())


def _result(correct: bool) -> ResultMessage:
    return ResultMessage("r", "cam", "dog", 4, 0.9, 4 if correct else 3, correct, (0,), 0.0)


def test_view_tracks_nodes_latency_accuracy_and_errors():
    view = PipelineView("p", slo_s=0.1)
    view.ingest(StatusMessage(node="n0", state="online", ts=0.0, stage=0), 0.0)
    view.ingest(
        MetricsMessage(
            node="n1",
            ts=1.0,
            stage=1,
            level=3,
            ratio=0.3,
            queue_depth=7,
            service_s=0.0421,
            processed=12,
            errors=1,
            shed=2,
            emulated_factor=3.0,
        ),
        1.0,
    )
    for i, lat in enumerate([0.05, 0.08, 0.2, 0.09]):
        view.ingest(_exit(lat), 1.0 + i)
        view.ingest(_result(i != 2), 1.0 + i)
    view.ingest(ErrorMessage(node="n1", topic="t", reason="bad shape", ts=2.0), 2.0)
    view.ingest(StatusMessage(node="n0", state="offline", ts=3.0, stage=0), 3.0)
    screen = view.render(5.0)
    assert "SLO met 75.0%" in screen
    assert "live accuracy 75.0%" in screen
    lines = {line.split()[0]: line for line in screen.splitlines() if line.startswith("n")}
    assert lines["n0"].split()[1] == "offline"
    cols = lines["n1"].split()
    assert cols[2:6] == ["1", "3", "0.3", "7"] and cols[6] == "42.1" and cols[-2] == "x3"
    assert "last error: n1: bad shape" in screen
    assert view.throughput(5.0, span_s=10.0) == 0.4


def test_view_without_traffic_says_so():
    assert "no exits yet" in PipelineView("p").render(0.0)
