"""The calibration package: files written before it still load and write back unchanged, the
controller reads a calibration without torch, and the one peak-memory helper measures what
the profile, the SlimEdge measurements and the multi-view costs count."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.calibration import Calibration
from pipeline.calibration.slimedge import Measurements
from pipeline.calibration.timing import peak_bytes

REPO = Path(__file__).resolve().parents[2]

# A version-1 calibration as `edgeprune calibrate` wrote it (trimmed: 3 levels, 2 slices).
V1_CALIBRATION = {
    "kind": "calibration",
    "version": 1,
    "model_hash": "60134d0011a4a0ec",
    "plan_hash": "30686c8e0aae8df3",
    "num_classes": 10,
    "ratios": [0.0, 0.25, 0.5],
    "slices": [
        {
            "stage": k,
            "start": start,
            "end": end,
            "device": device,
            "points": [[0.0, 0.0022], [0.25, 0.0014], [0.5, 0.0008]],
            "fit": {"kind": "linear", "a": -0.0028, "b": 0.00217, "r2": 0.998},
        }
        for k, (start, end, device) in enumerate([(0, 3, "pi-a"), (3, 5, "pi-b")])
    ],
    "accuracy": {
        "points": [
            {"ratios": [a, b], "accuracy": 0.99 - 0.02 * (a + b)}
            for a in (0.0, 0.25, 0.5)
            for b in (0.0, 0.25, 0.5)
        ],
        "fit": {
            "kind": "logistic_accuracy",
            "form": "scaled",
            "g": [-7.2, -9.1],
            "d": -6.3,
            "lo": 0.1,
            "hi": 0.991,
            "max_abs_error": 0.004,
        },
    },
    "meta": {"model": "resnet-s", "split": "val", "samples": 1000},
}

# A version-1 SlimEdge measurements file (2 blocks, 2 levels, one combo).
V1_MEASUREMENTS = {
    "kind": "slimedge-measurements",
    "version": 1,
    "model": "resnet-s",
    "model_hash": "60134d0011a4a0ec",
    "num_classes": 10,
    "ratios": [0.0, 0.5],
    "block_names": ["stem", "head"],
    "blocks": {
        "time_s": [[0.001, 0.0006], [0.0002, 0.0001]],
        "param_bytes": [[4096.0, 1024.0], [2560.0, 1280.0]],
        "activation_bytes": [[65536.0, 40960.0], [1024.0, 512.0]],
        "output_bytes": [[32768.0, 16448.0], [40.0, 40.0]],
    },
    "ranges": [[0, 1], [0, 2], [1, 2]],
    "range_time_s": [[0.001, 0.0006], [0.0012, 0.0007], [0.0002, 0.0001]],
    "range_accuracy": [[0.99, 0.95], [0.99, 0.9], [0.99, 0.97]],
    "combos": [{"bounds": [[0, 1], [1, 2]], "levels": [1, 1], "accuracy": 0.93}],
    "meta": {"split": "val", "samples": 1000},
}


def test_a_version_1_calibration_loads_and_writes_back_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(V1_CALIBRATION))
    cal = Calibration.load(path)
    assert [s.device for s in cal.slices] == ["pi-a", "pi-b"]
    assert cal.unpruned_accuracy == 0.99
    assert json.loads(cal.save(tmp_path / "again.json").read_text()) == V1_CALIBRATION


def test_a_version_1_measurements_file_loads_and_writes_back_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "measurements.json"
    path.write_text(json.dumps(V1_MEASUREMENTS))
    m = Measurements.load(path)
    assert m.n_blocks == 2 and m.unpruned_accuracy == 0.99
    assert np.allclose(m.block_importance(), [[0.0, 0.04], [0.0, 0.02]])
    assert json.loads(m.save(tmp_path / "again.json").read_text()) == V1_MEASUREMENTS


def test_the_controller_and_plain_timing_run_without_torch(tmp_path: Path) -> None:
    """The controller imports ``pipeline.calibration`` only; loading a file there must not
    pull in torch (seconds of start-up and hundreds of MB on a small device). Timing plain
    Python code (``bench codec``, ``bench controller``) must not load it either: importing
    torch changes how glibc hands out large blocks, and with it the time of large copies."""
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(V1_CALIBRATION))
    code = (
        "import sys\n"
        "from pipeline.calibration import Calibration\n"
        "from pipeline.calibration.timing import time_calls\n"
        "import controller.core\n"
        f"Calibration.load({str(path)!r})\n"
        "time_calls([lambda: None], runs=3, warmup=1, torch_inference=False)\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_mismatch_says_why_a_calibration_does_not_belong() -> None:
    cal = Calibration.from_dict(V1_CALIBRATION)
    model, plan, ratios = cal.model_hash, cal.plan_hash, (0.0, 0.25, 0.5)
    assert cal.mismatch(model, plan, ratios) is None
    assert "model" in (cal.mismatch("another", plan, ratios) or "")
    assert "plan" in (cal.mismatch(model, "another", ratios) or "")
    assert "levels" in (cal.mismatch(model, plan, (0.0, 0.5)) or "")


def test_peak_bytes_is_the_largest_leaf_tensor_and_leaves_no_hook() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),  # [1, 8, 8, 8]: 2048 bytes, the largest
        nn.ReLU(),
        nn.MaxPool2d(2),  # [1, 8, 4, 4]
        nn.Flatten(),
        nn.Linear(128, 3),
    ).eval()
    x = torch.randn(1, 1, 8, 8)
    peak, y = peak_bytes(net, x)
    assert peak == 8 * 8 * 8 * 4
    assert torch.equal(y, net(x))
    assert not any(m._forward_hooks for m in net.modules())
    leaf = nn.Linear(4, 2)  # a module without children counts its own output
    assert peak_bytes(leaf, torch.zeros(3, 4))[0] == 3 * 2 * 4
