"""Profiling: sane per-block numbers, profile files, device files with an own profile, and
device-file based partitioning end to end (Python API and CLI)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from edgeprune.cli import main as cli_main
from pipeline.calibration.timing import time_calls
from pipeline.errors import ConfigError
from pipeline.models import SliceableResNet, build_model, preset
from pipeline.partition import BlockProfile, Device, Plan, load_devices, partition
from pipeline.profiling import (
    DeviceSpec,
    ModelProfile,
    device_specs_from_toml,
    load_device_specs,
    load_profile,
    profile_blocks,
    profile_model,
    resolve_devices,
)

REPO = Path(__file__).resolve().parents[2]
DEVICE_FILES = sorted((REPO / "devices").glob("*.toml"))


@pytest.fixture(scope="module")
def xs_profile() -> tuple[SliceableResNet, ModelProfile]:
    torch.manual_seed(0)
    model = build_model(preset("resnet-xs")).eval()
    return model, profile_model(model, model_hash="abc", runs=20, warmup=3, rounds=2)


def test_profile_of_resnet_xs_is_sane(xs_profile: tuple[SliceableResNet, ModelProfile]) -> None:
    model, prof = xs_profile
    assert prof.block_names == model.block_names()
    assert all(b.compute_s > 0 for b in prof.blocks)
    assert sum(b.param_bytes for b in prof.blocks) == 4 * sum(p.numel() for p in model.parameters())
    x = torch.zeros(model.input_shape(1))
    with torch.no_grad():
        for block, b, d in zip(model.blocks, prof.blocks, prof.details, strict=True):
            in_bytes = 4 * x.numel()
            x = block(x)
            assert b.output_bytes == 4 * math.prod(x.shape)
            assert b.activation_bytes >= in_bytes + b.output_bytes
            assert d.params == sum(p.numel() for p in block.parameters())
            assert d.out_shape == tuple(x.shape[1:])
            assert d.p10_s <= b.compute_s <= d.p90_s
    assert prof.settings["threads"] == 1 and prof.settings["batch"] == 1
    assert prof.machine["torch"] == str(torch.__version__)
    assert torch.get_num_threads() >= 1  # the thread count is restored afterwards


def test_profile_blocks_returns_block_profiles() -> None:
    model = build_model(preset("resnet-xs"))
    blocks = profile_blocks(model, runs=3, warmup=1, rounds=1)
    assert [b.name for b in blocks] == model.block_names()
    assert all(isinstance(b, BlockProfile) for b in blocks)


def test_profile_json_round_trip(
    tmp_path: Path, xs_profile: tuple[SliceableResNet, ModelProfile]
) -> None:
    _, prof = xs_profile
    path = prof.save(tmp_path / "sub" / "p.json")
    again = load_profile(path)
    assert again == prof
    assert json.loads(path.read_text())["model"]["hash"] == "abc"


def test_bad_profile_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"kind": "calibration"}))
    with pytest.raises(ConfigError, match="not a profile"):
        load_profile(bad)
    bad.write_text("{")
    with pytest.raises(ConfigError, match="cannot read"):
        load_profile(bad)
    bad.write_text(
        json.dumps(
            {
                "kind": "profile",
                "version": 1,
                "model": {"name": "m"},
                "blocks": [
                    {
                        "name": "b",
                        "compute_s": -1,
                        "param_bytes": 0,
                        "activation_bytes": 0,
                        "output_bytes": 0,
                    }
                ],
            }
        )
    )
    with pytest.raises(ConfigError):
        load_profile(bad)


def test_time_calls_interleaves_and_validates() -> None:
    calls: list[int] = []
    times = time_calls(
        [lambda: calls.append(0), lambda: calls.append(1)], runs=6, warmup=2, rounds=3
    )
    assert [len(t.wall) for t in times] == [6, 6] == [len(t.cpu) for t in times]
    assert all(np.all(t.wall >= 0) and np.all(t.cpu >= 0) for t in times)
    # warm-up of each, then rounds of two calls per function, alternating
    assert calls == [0, 0, 1, 1] + [0, 0, 1, 1] * 3
    with pytest.raises(ConfigError):
        time_calls([lambda: None], runs=0, warmup=0)


def test_cpu_clock_ignores_waiting() -> None:
    (slept,) = time_calls([lambda: time.sleep(0.003)], runs=3, warmup=0, rounds=1)
    assert slept.median("wall") >= 0.003
    assert slept.median("cpu") < 0.002
    assert slept.busy_ratio > 1.5
    with pytest.raises(ConfigError):
        slept.of("gpu")  # type: ignore[arg-type]


def _own_profile(prof: ModelProfile, factor: float) -> ModelProfile:
    blocks = tuple(
        BlockProfile(
            b.name, b.compute_s * factor, b.param_bytes, b.activation_bytes, b.output_bytes
        )
        for b in prof.blocks
    )
    return ModelProfile(blocks=blocks, model_name=prof.model_name)


def test_device_file_with_own_profile(
    tmp_path: Path, xs_profile: tuple[SliceableResNet, ModelProfile]
) -> None:
    _, prof = xs_profile
    _own_profile(prof, 4.0).save(tmp_path / "profiles" / "slow.json")
    text = """
[[device]]
name = "fast"
speed = 2.0
memory_mb = 64
bandwidth_mbps = 100
latency_ms = 1

[[device]]
name = "measured"
profile = "profiles/slow.json"
memory_mb = 64
bandwidth_mbps = 100
latency_ms = 1
"""
    (tmp_path / "devs.toml").write_text(text)
    specs = load_device_specs(tmp_path / "devs.toml")
    assert [s.name for s in specs] == ["fast", "measured"]
    fast, measured = specs
    assert fast.profile is None and fast.time_factor(0, 2, 1.0) == pytest.approx(0.5)
    assert measured.profile is not None and not measured.speed_given
    ref = sum(b.compute_s for b in prof.blocks[1:3])
    assert measured.time_factor(1, 3, ref) == pytest.approx(4.0)
    devices = resolve_devices(specs, prof.blocks)
    assert devices[0] == fast.device
    assert devices[1].speed == pytest.approx(0.25)
    assert "profile" in measured.to_dict() and "speed" not in measured.to_dict()
    plan = partition(prof.blocks, devices)
    assert plan.n_blocks == len(prof.blocks)


def test_device_file_errors(tmp_path: Path) -> None:
    base = 'name = "d"\nmemory_mb = 1\nbandwidth_mbps = 1\nlatency_ms = 0\n'
    with pytest.raises(ConfigError, match="cannot read profile"):
        device_specs_from_toml(f'[[device]]\n{base}profile = "missing.json"\n', base_dir=tmp_path)
    with pytest.raises(ConfigError, match="missing keys"):
        device_specs_from_toml(f"[[device]]\n{base}")  # neither speed nor profile
    with pytest.raises(ConfigError, match="unknown keys"):
        device_specs_from_toml(f"[[device]]\n{base}speed = 1\ncolour = 'red'\n")
    with pytest.raises(ConfigError, match="duplicate"):
        device_specs_from_toml(f"[[device]]\n{base}speed = 1\n[[device]]\n{base}speed = 2\n")
    with pytest.raises(ConfigError, match="no"):
        device_specs_from_toml("[device]\nname = 'd'\n")
    with pytest.raises(ConfigError, match="unknown top-level"):
        device_specs_from_toml(f"colour = 1\n[[device]]\n{base}speed = 1\n")
    other = ModelProfile(blocks=(BlockProfile("x", 1.0, 0, 0, 0),), model_name="other")
    spec = DeviceSpec(Device("d", 1.0, 1, 1, 0), other, "other.json", speed_given=False)
    with pytest.raises(ConfigError, match="has blocks"):
        spec.resolve([BlockProfile("y", 1.0, 0, 0, 0)])


@pytest.mark.parametrize("path", DEVICE_FILES, ids=lambda p: p.name)
def test_shipped_device_files_load(path: Path) -> None:
    devices = load_devices(path)  # partition.py's own loader accepts them too
    specs = load_device_specs(path)
    assert [d.name for d in devices] == [s.name for s in specs]


def test_shipped_device_files_exist() -> None:
    assert {p.name for p in DEVICE_FILES} >= {"two-pi4.toml", "three-mixed.toml", "local.toml"}


def test_profile_and_partition_cli_end_to_end(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prof_path, plan_path = tmp_path / "profile.json", tmp_path / "plan.json"
    assert (
        cli_main(
            [
                "profile",
                "--model",
                "resnet-xs",
                "--runs",
                "5",
                "--warmup",
                "1",
                "--out",
                str(prof_path),
            ]
        )
        == 0
    )
    assert prof_path.with_suffix(".png").stat().st_size > 0
    prof = load_profile(prof_path)
    assert prof.model_name == "resnet-xs" and prof.model_hash is None
    assert (
        cli_main(
            [
                "partition",
                "--profile",
                str(prof_path),
                "--devices",
                str(REPO / "devices" / "local.toml"),
                "--out",
                str(plan_path),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "bottleneck" in out and "equivalent cuts" in out
    doc = json.loads(plan_path.read_text())
    plan = Plan.from_dict(doc)
    assert plan.n_blocks == len(prof.blocks)
    assert doc["cuts"] == ",".join(str(s.start_block) for s in plan.stages[1:])
    assert plan.bottleneck_s == pytest.approx(max(s.predicted_s or 0 for s in plan.stages))
    expected = partition(prof.blocks, load_devices(REPO / "devices" / "local.toml"))
    assert plan.plan_hash() == expected.plan_hash()
    assert plan_path.with_suffix(".png").stat().st_size > 0
    # the stage costs the table shows add up to the partitioner's predictions
    for stage, cost in zip(plan.stages, doc["stage_costs"], strict=True):
        assert cost["compute_s"] + cost["transfer_s"] == pytest.approx(stage.predicted_s)
