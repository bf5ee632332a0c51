"""`edgeprune experiment` end to end: a real broker, nodes, controller and camera as separate
processes, on a tiny, highly compressed trace window (seconds, not minutes).

The calibration is a real but small one (two levels, few timing runs, 200 held-out images),
measured once for the module; the experiment reuses it because its hashes match.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from bus.observer import load_events
from pipeline.calibration.measure import CalibrationSettings, calibrate
from pipeline.checkpoint import Checkpoint
from pipeline.data import load_dataset, split_dataset
from pipeline.placement import SliceBounds
from tests.helpers import DATA_DIR, REPO

pytestmark = pytest.mark.slow

CONFIG = """
[experiment]
name = "{name}"
startup_budget_s = 1
warmup_images = 2

[model]
calibration = "{calibration}"
ratios = [0.0, 0.5]

[plan]
cuts = [3]
nodes = ["n0", "n1"]

[trace]
names = ["orinoquia_day1"]
compression = 200
max_idle_s = 10
max_images = {images}
drain_s = 60

[emulation.n1]
factor = 2
windows = [[0.5, 3, 3]]
hog_windows = [[0.5, 1.5]]   # a real CPU hog beside n1 for one second

[controller]
slo_ms = 100
a_min = 0.5
"""


@pytest.fixture(scope="module")
def calibration_file(tmp_path_factory: pytest.TempPathFactory, checkpoint: Checkpoint) -> Path:
    data = split_dataset(load_dataset("animal-mnist", DATA_DIR)).val
    data = data.subset(np.arange(200), "val-200")
    cal = calibrate(
        checkpoint,
        data,
        bounds=[SliceBounds(0, 3), SliceBounds(3, 5)],
        nodes=["n0", "n1"],
        settings=CalibrationSettings(ratios=(0.0, 0.5), runs=10, warmup=2, rounds=2),
        progress=False,
    )
    return cal.save(tmp_path_factory.mktemp("calibration") / "calibration.json")


def write_config(tmp_path: Path, calibration: Path, images: int) -> tuple[str, Path]:
    name = f"exp-test-{uuid.uuid4().hex[:8]}"
    path = tmp_path / "scenario.toml"
    path.write_text(CONFIG.format(name=name, calibration=calibration, images=images))
    return name, path


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that contain ``text`` (our children carry the unique
    experiment name as their pipe)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            found.append(cmdline)
    return found


def experiment(args: list[str], **kwargs) -> subprocess.Popen[str]:
    env = {**os.environ, "EDGEPRUNE_DATA_DIR": str(DATA_DIR)}
    return subprocess.Popen(
        [sys.executable, "-m", "edgeprune", "--log-level", "WARNING", "experiment", *args],
        cwd=REPO,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kwargs,
    )


def test_compare_prints_one_json_object_and_every_request_has_a_result(
    tmp_path: Path, calibration_file: Path
) -> None:
    name, config = write_config(tmp_path, calibration_file, images=25)
    out = tmp_path / "out"
    # startup_budget_s = 1: the replay starts late on purpose (no waiting), so no retries
    proc = experiment(
        [
            str(config),
            "--compare",
            "static,static:1,oracle",
            "--json",
            "--quiet",
            "--retries",
            "0",
            "--out",
            str(out),
        ]
    )
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr[-3000:]
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert len(lines) == 1, stdout  # exactly one JSON object on stdout
    result = json.loads(lines[0])
    assert set(result["policies"]) == {"static", "static:1", "oracle"}
    for policy, summary in result["policies"].items():
        for key in ("slo_attainment", "p95_ms", "accuracy", "attainment_vs_oracle"):
            assert isinstance(summary[key], float), (policy, key, summary)
        assert set(result["headline"][policy]) == {
            "slo_attainment",
            "accuracy",
            "p95_ms",
            "attainment_vs_oracle",
        }
        assert summary["sent"] == 25
        assert summary["completed"] == summary["sent"]
        assert summary["lost"] == 0
        assert 0.0 <= summary["slo_attainment"] <= 1.0
        assert summary["p50_ms"] <= summary["p95_ms"] <= summary["p99_ms"]
        assert 0.5 <= summary["accuracy"] <= 1.0
        assert result["checks"][policy]["every_request_has_a_result"] is True
        assert result["checks"][policy]["orphans"] == []
    assert result["policies"]["oracle"]["attainment_vs_oracle"] == 1.0
    assert result["baseline"] == "static" and "oracle" in result["speedup_p95"]
    assert isinstance(result["dominance"], list) and result["orders"] == [
        ["static", "static:1", "oracle"]
    ]
    assert any("x3" in line and "CPU hog" in line for line in result["emulation"])

    report = json.loads((out / "report.json").read_text())
    for policy in ("static", "static:1", "oracle"):
        run = report["runs"][policy]
        tag = policy.replace(":", "-")
        events = load_events(out / tag / "events.jsonl")  # the warm-up does not count
        sent = {e["request_id"] for e in events["send"]}
        assert len(sent) == run["summary"]["sent"] == 25
        assert {e["request_id"] for e in events["result"]} == sent
        assert {e["request_id"] for e in events["exit"]} == sent
        assert run["camera"]["sent"] == run["camera"]["completed"] == 25  # the camera agrees
        assert run["timing"]["camera_offset_s"] is not None
    # static:1 held both stages at level 1 from before the first image to the last
    results = load_events(out / "static-1" / "events.jsonl")["result"]
    assert results and all(r["levels"] == [1, 1] for r in results)
    # the oracle knew the slowdown window on n1 ([0.5, 3) s, x3 on top of x2) in advance
    schedule = json.loads((out / "oracle" / "oracle-schedule.json").read_text())
    assert [s["start_s"] for s in schedule["segments"]] == [0.0, 0.5, 3.0]
    assert [s["slowdowns"] for s in schedule["segments"]] == [[1.0, 2.0], [1.0, 6.0], [1.0, 2.0]]
    assert "burnt one core" in (out / "static" / "logs" / "hog-n1.log").read_text()
    for png in (
        "timeline-static.png",
        "timeline-static-1.png",
        "timeline-oracle.png",
        "latency-cdf.png",
        "timelines.png",
        "attainment-vs-accuracy.png",
    ):
        assert (out / png).stat().st_size > 10_000
    md = (out / "report.md").read_text()
    assert "| SLO attainment |" in md and "| SLO attainment vs oracle |" in md
    assert "Static levels against the controllers" in md
    assert processes_mentioning(name) == []
    assert processes_mentioning(str(out)) == []  # the brokers' command lines name their dir


def test_interrupt_mid_run_leaves_no_process_behind(tmp_path: Path, calibration_file: Path) -> None:
    name, config = write_config(tmp_path, calibration_file, images=400)
    out = tmp_path / "out"
    proc = experiment([str(config), "--policy", "static", "--out", str(out)])
    events = out / "static" / "events.jsonl"
    deadline = time.monotonic() + 150
    # interrupt once the nodes serve (their retained "online" status has been recorded)
    while not (events.exists() and '"state": "online"' in events.read_text()):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the nodes never came online"
        time.sleep(0.1)
    assert processes_mentioning(name), "the children should be running now"
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr[-3000:]
    assert processes_mentioning(name) == []
    assert processes_mentioning(str(out)) == []
