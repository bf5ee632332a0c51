"""Profiling: sane per-block numbers, profile files, and device-file based partitioning end to
end (Python API and CLI). Device files with an own profile: test_devices.py."""

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
from pipeline.devices import load_devices
from pipeline.errors import ConfigError
from pipeline.models import SliceableResNet, build_model, preset
from pipeline.partition import BlockProfile, Partition, partition
from pipeline.profiling import (
    ModelProfile,
    load_profile,
    profile_blocks,
    profile_model,
)

REPO = Path(__file__).resolve().parents[2]


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
    plan = Partition.from_dict(doc)
    assert plan.placement.num_blocks == len(prof.blocks) and plan.stage_s is not None
    assert doc["cuts"] == ",".join(str(b.start) for b in plan.placement.bounds[1:])
    assert plan.bottleneck_s == pytest.approx(max(plan.stage_s))
    expected = partition(prof.blocks, load_devices(REPO / "devices" / "local.toml"))
    assert plan.placement == expected.placement
    assert plan_path.with_suffix(".png").stat().st_size > 0
    # the stage costs the table shows add up to the partitioner's predictions
    for stage_s, cost in zip(plan.stage_s, doc["stage_costs"], strict=True):
        assert cost["compute_s"] + cost["transfer_s"] == pytest.approx(stage_s)
