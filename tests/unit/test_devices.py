"""Device files (pipeline/devices.py): one loader, one set of rules, errors that name the file and
the key; a device file that works for `partition` works for `plan` (and the other way round)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from controller.slimedge import Planner
from edgeprune.cli import main as cli_main
from pipeline.calibration.accuracy import AccuracyModel
from pipeline.calibration.slimedge import CostTable, contiguous_ranges
from pipeline.devices import Device, devices_from_toml, load_devices
from pipeline.errors import ConfigError
from pipeline.partition import BlockProfile, Partition, partition
from pipeline.profiling import ModelProfile

REPO = Path(__file__).resolve().parents[2]
DEVICE_FILES = sorted((REPO / "devices").glob("*.toml"))

DEVICES_TOML = """
[[device]]
name = "pi4-a"
speed = 0.25
memory_mb = 2048
bandwidth_mbps = 90
latency_ms = 2

[[device]]
name = "pi4-b"
speed = 0.2
memory_mb = 1024
bandwidth_mbps = 50.5
latency_ms = 3.5
failure_prob = 0.05
"""


def test_device_file(tmp_path: Path) -> None:
    path = tmp_path / "devices.toml"
    path.write_text(DEVICES_TOML)
    devices = load_devices(path)
    assert [d.name for d in devices] == ["pi4-a", "pi4-b"]
    assert devices[0].failure_prob == 0.0 and devices[1].failure_prob == 0.05
    assert Device.from_dict(devices[1].to_dict()) == devices[1]
    with pytest.raises(ConfigError, match="cannot read"):
        load_devices(tmp_path / "missing.toml")
    assert devices_from_toml(DEVICES_TOML) == devices  # the same rules for a file's text
    with pytest.raises(ConfigError, match=r"^inline.toml: \[\[device\]\] #2: device 'pi4-b'"):
        devices_from_toml(
            DEVICES_TOML.replace("speed = 0.2\n", "speed = 0\n"), source="inline.toml"
        )


@pytest.mark.parametrize(
    ("old", "new", "says"),
    [
        ("speed = 0.25", "speed = -1", "'pi4-a' speed must be > 0"),
        ("speed = 0.25", "speed = 0", "'pi4-a' speed must be > 0"),
        ("speed = 0.25", 'speed = "fast"', "'pi4-a' speed must be a finite number"),
        ("speed = 0.25", "speed = true", "'pi4-a' speed must be a finite number"),
        ("speed = 0.25", "speed = nan", "'pi4-a' speed must be a finite number"),
        ("speed = 0.25\n", "", r"'pi4-a': missing keys \['speed \(or profile\)'\]"),
        ("memory_mb = 2048", "memory_mb = 0", "'pi4-a' memory_mb must be > 0"),
        ("bandwidth_mbps = 90", "", r"'pi4-a': missing keys \['bandwidth_mbps'\]"),
        ("latency_ms = 2", "latency_ms = -2", "'pi4-a' latency_ms must be >= 0"),
        ("failure_prob = 0.05", "failure_prob = 1.0", "'pi4-b' failure_prob must be < 1"),
        ("latency_ms = 2", "latency_ms = 2\ncolour = 'red'", r"unknown keys \['colour'\]"),
        ('name = "pi4-b"', 'name = "pi4-a"', "duplicate device names"),
        ('name = "pi4-b"', 'name = ""', "name must be a non-empty string"),
        ("[[device]]", "[[devices]]", r"unknown top-level keys \['devices'\]"),
        ("speed = 0.2\n", "speed = = 0.2\n", "not valid TOML"),
        ("speed = 0.2\n", 'speed = 0.2\nprofile = ""\n', "profile must be a file name"),
        ("speed = 0.2\n", 'profile = "missing.json"\n', "cannot read profile"),
    ],
)
def test_device_file_rejects_bad_values_naming_file_and_key(
    tmp_path: Path, old: str, new: str, says: str
) -> None:
    path = tmp_path / "devs.toml"
    path.write_text(DEVICES_TOML.replace(old, new, 1))
    with pytest.raises(ConfigError, match=says) as err:
        load_devices(path)
    assert str(err.value).startswith(str(path))


@pytest.mark.parametrize("path", DEVICE_FILES, ids=lambda p: p.name)
def test_shipped_device_files_load(path: Path) -> None:
    devices = load_devices(path)
    assert devices and all(d.speed is not None and d.profile is None for d in devices)


def test_shipped_device_files_exist() -> None:
    assert {p.name for p in DEVICE_FILES} >= {"two-pi4.toml", "three-mixed.toml", "local.toml"}


BLOCKS = ("stem", "s1b1", "s2b1", "s3b1", "head")  # resnet-s, as the stand-in cost table


def _profile(factor: float) -> ModelProfile:
    blocks = tuple(
        BlockProfile(name, 1e-3 * (k + 1) * factor, 10_000, 20_000, 5_000)
        for k, name in enumerate(BLOCKS)
    )
    return ModelProfile(blocks=blocks, model_name="resnet-s")


def _profiled_device_file(tmp_path: Path) -> Path:
    """Device `fast` by speed, device `measured` by its own profile (4x the reference times)
    and no speed: the file `plan` used to refuse (unknown key 'profile', missing 'speed')."""
    _profile(4.0).save(tmp_path / "profiles" / "measured.json")
    path = tmp_path / "devs.toml"
    path.write_text(
        '[[device]]\nname = "fast"\nspeed = 2.0\nmemory_mb = 64\nbandwidth_mbps = 100\n'
        "latency_ms = 1\n\n"
        '[[device]]\nname = "measured"\nprofile = "profiles/measured.json"\nmemory_mb = 64\n'
        "bandwidth_mbps = 100\nlatency_ms = 1\nfailure_prob = 0.1\n"
    )
    return path


def test_device_with_own_profile(tmp_path: Path) -> None:
    fast, measured = load_devices(_profiled_device_file(tmp_path))
    reference = _profile(1.0)
    names, times = reference.block_names, list(reference.block_times)
    assert fast.relative_speed(names, times) == 2.0 and fast.time_factor(0, 2, 1.0) == 0.5
    assert measured.speed is None
    assert measured.profile == str(tmp_path / "profiles" / "measured.json")
    assert measured.relative_speed(names, times) == pytest.approx(0.25)
    assert measured.time_factor(1, 3, sum(times[1:3])) == pytest.approx(4.0)
    assert "speed" not in measured.to_dict()
    assert Device.from_dict(measured.to_dict()) == measured
    with pytest.raises(ConfigError, match=r"its profile .* has blocks"):
        measured.relative_speed(["x"], [1.0])
    with pytest.raises(ConfigError, match="give speed or profile"):
        Device("d", None, 1, 1, 0)


def test_a_profiled_device_file_works_for_partition_and_the_planner(tmp_path: Path) -> None:
    fast, measured = load_devices(_profiled_device_file(tmp_path))
    reference = _profile(1.0)
    total = sum(reference.block_times)
    # alone, `measured` runs every block 4x slower than the reference (not at speed 1)
    alone = partition(reference.blocks, [measured])
    assert alone.bottleneck_s == pytest.approx(4 * total)
    assert partition(reference.blocks, [fast, measured]).placement.num_blocks == len(BLOCKS)
    ratios = (0.0, 0.5)
    n = len(BLOCKS)
    times = np.asarray([[t * (1 - r) for r in ratios] for t in reference.block_times])
    small = np.full((n, len(ratios)), 1e3)
    table = CostTable(BLOCKS, ratios, times, small, small, small)
    accuracy = AccuracyModel.from_importance(
        0.9, np.full((len(contiguous_ranges(n)), len(ratios)), 0.9), num_classes=10
    )
    planner = Planner(table, accuracy)
    only = planner.plan([measured], 0.0, levels=0).best
    assert only is not None and only.bottleneck_s == pytest.approx(4 * total)
    both = planner.plan([fast, measured], 0.0).best
    assert both is not None and both.placement.num_blocks == n


@pytest.mark.slow
def test_the_same_device_file_through_the_partition_and_plan_commands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipeline.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint
    from tests.helpers import DATA_DIR, stand_in_measurements

    monkeypatch.chdir(tmp_path)
    devices = _profiled_device_file(tmp_path)
    _profile(1.0).save(tmp_path / "reference.json")
    assert (
        cli_main(
            [
                "partition",
                "--profile",
                str(tmp_path / "reference.json"),
                "--devices",
                str(devices),
                "--out",
                str(tmp_path / "plan.json"),
                "--json",
            ]
        )
        == 0
    )
    doc = json.loads((tmp_path / "plan.json").read_text())
    Partition.from_dict(doc)
    assert [d["speed_used"] for d in doc["devices"]] == pytest.approx([2.0, 0.25])
    measurements = stand_in_measurements(load_checkpoint(DEFAULT_CHECKPOINT)).save(
        tmp_path / "measurements.json"
    )
    capsys.readouterr()
    assert (
        cli_main(
            [
                "plan",
                "--devices",
                str(devices),
                "--checkpoint",
                str(DEFAULT_CHECKPOINT),
                "--measurements",
                str(measurements),
                "--data-dir",
                str(DATA_DIR),
                "--floor",
                "0.5",
                "--no-veto",
                "--json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["best"]["stages"] and set(out["devices"]) == {"fast", "measured"}
