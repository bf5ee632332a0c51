"""The calibration procedure on a tiny trained model: level-vector selection, the prefix-cached
accuracy sweep, plan hashes, loadable calibration files (Python API and CLI)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edgeprune.cli import main as cli_main
from pipeline.calibration import Calibration
from pipeline.calibration.accuracy import (
    LogisticAccuracyFit,
    MeasuredAccuracy,
    accuracy_at_levels,
    accuracy_fit_check,
)
from pipeline.calibration.measure import (
    CalibrationSettings,
    calibrate,
    level_vectors,
    load_plan,
    plan_hash_of,
)
from pipeline.calibration.plot import plot_calibration
from pipeline.calibration.slimedge import SliceBank
from pipeline.calibration.slimedge import measure as slimedge_measure
from pipeline.checkpoint import Checkpoint, save_checkpoint
from pipeline.data import ArrayDataset, Preprocess
from pipeline.devices import Device
from pipeline.errors import ConfigError
from pipeline.models import build_model, preset
from pipeline.partition import Partition
from pipeline.placement import Placement, SliceBounds
from pipeline.reference import ComposedPipeline
from pipeline.slicing import parse_cuts
from pipeline.training import accuracy

CLASSES = ("a", "b", "c", "d")
FAST = CalibrationSettings(ratios=(0.0, 0.25, 0.5), runs=4, warmup=1, rounds=2, batch_size=64)


SIZE = 16  # a small input keeps the tests fast


def toy_dataset(n: int, seed: int) -> ArrayDataset:
    """4 classes: a bright square in one quadrant of a noisy grey image."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 4
    images = rng.integers(0, 60, size=(n, SIZE, SIZE)).astype(np.uint8)
    h = SIZE // 2
    for i, label in enumerate(labels):
        r, c = divmod(int(label), 2)
        images[i, h * r + 2 : h * r + h - 2, h * c + 2 : h * c + h - 2] = 220
    return ArrayDataset(images, labels.astype(np.int64), CLASSES, "toy")


@pytest.fixture(scope="module")
def tiny(one_thread: None) -> tuple[Checkpoint, ArrayDataset]:
    """A resnet-xs trained for a few steps on the toy task, and held-out toy images."""
    torch.manual_seed(0)
    train = toy_dataset(256, seed=1)
    pre = Preprocess(mean=0.2, std=0.3, size=SIZE, channels=1)
    model = build_model(preset("resnet-xs", num_classes=4, class_names=CLASSES, input_size=SIZE))
    x, y = pre(train.images), torch.from_numpy(train.labels)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for step in range(20):
        idx = torch.arange(step * 32, step * 32 + 32) % len(x)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    model.eval()
    ckpt = Checkpoint(
        config=model.config,
        preprocess=pre,
        state_dict={k: v.detach().clone() for k, v in model.state_dict().items()},
        calibration_images=train.images[:64],
    )
    return ckpt, toy_dataset(120, seed=2)


def test_level_vectors_full_grid_and_sampled() -> None:
    grid, full = level_vectors(2, 6)
    assert full and grid == list(itertools.product(range(6), repeat=2))
    vecs, full = level_vectors(3, 6, grid_limit=64, samples=40, seed=3)
    assert not full and len(vecs) == 40 == len(set(vecs)) and vecs == sorted(vecs)
    assert set(itertools.product((0, 5), repeat=3)) <= set(vecs)  # corners
    assert {(k, k, k) for k in range(6)} <= set(vecs)  # uniform diagonal
    assert vecs == level_vectors(3, 6, grid_limit=64, samples=40, seed=3)[0]
    assert vecs != level_vectors(3, 6, grid_limit=64, samples=40, seed=4)[0]
    assert len(level_vectors(3, 6, samples=5)[0]) == 8 + 4  # never fewer than corners + diagonal
    assert len(level_vectors(2, 3, grid_limit=4, samples=100)[0]) == 9  # capped at the grid


def test_plan_hash_of_matches_plan() -> None:
    bounds = parse_cuts("2,3", 5)
    placement = Placement.build(bounds, ["a", "b", "c"])
    assert plan_hash_of(bounds, ["a", "b", "c"]) == placement.placement_hash()
    assert plan_hash_of(bounds) == plan_hash_of(bounds, ["n0", "n1", "n2"])
    assert plan_hash_of(bounds) != plan_hash_of(parse_cuts("2", 5), ["n0", "n1"])
    assert plan_hash_of(bounds) != plan_hash_of(bounds, ["n0", "n2", "n1"])
    with pytest.raises(ConfigError):
        plan_hash_of(bounds, ["a"])


def test_prefix_cached_sweep_equals_full_runs(tiny: tuple[Checkpoint, ArrayDataset]) -> None:
    ckpt, data = tiny
    pipe = ComposedPipeline(ckpt, parse_cuts("2,3", 5), ratios=FAST.ratios)
    x, y = ckpt.preprocess(data.images), torch.from_numpy(data.labels)
    vectors = [(2, 0, 1), (0, 0, 0), (2, 0, 2), (1, 2, 0), (2, 1, 1), (0, 0, 2)]  # unsorted
    cached = accuracy_at_levels(pipe.slices, vectors, x, y, batch_size=50)
    for vec, acc in zip(vectors, cached, strict=True):
        pipe.set_levels(vec)
        assert acc == pytest.approx(accuracy(pipe, x, y))


def test_calibrate_tiny_model(tmp_path: Path, tiny: tuple[Checkpoint, ArrayDataset]) -> None:
    ckpt, data = tiny
    bounds = parse_cuts("2", 5)
    cal = calibrate(ckpt, data, bounds=bounds, settings=FAST, progress=False)
    assert len(cal.slices) == 2 and cal.accuracy_fit.n_slices == 2
    assert [(s.start, s.end) for s in cal.slices] == [(0, 2), (2, 5)]
    assert [s.device for s in cal.slices] == ["n0", "n1"]
    grid = {tuple(FAST.ratios[k] for k in v) for v in itertools.product(range(3), repeat=2)}
    assert {r for r, _ in cal.accuracy_points} == grid
    assert len(cal.accuracy_points) == len(grid)
    assert all(0.0 <= a <= 1.0 for _, a in cal.accuracy_points)
    assert cal.unpruned_accuracy > 0.5  # the toy task is learnt
    assert cal.model_hash == ckpt.model_hash()
    assert cal.plan_hash == plan_hash_of(bounds)
    assert cal.num_classes == 4 and cal.accuracy_fit.lo == pytest.approx(0.25)
    for s in cal.slices:
        assert [r for r, _ in s.points] == list(FAST.ratios)
        assert all(t > 0 for _, t in s.points)
        assert s.fit.r2 <= 1.0
    assert cal.meta["emulated"] is False and cal.meta["samples"] == len(data)
    assert cal.meta["split"] == "val"
    assert cal.meta["accuracy_fit_check"]["max_abs_error"] == pytest.approx(
        cal.accuracy_fit.max_abs_error
    )
    # JSON round trip through the controller's loader
    again = Calibration.load(cal.save(tmp_path / "cal.json"))
    assert again.to_dict() == json.loads(json.dumps(cal.to_dict()))
    assert plot_calibration(again, tmp_path / "cal.png").stat().st_size > 0


def test_calibrate_with_plan_and_devices(tiny: tuple[Checkpoint, ArrayDataset]) -> None:
    ckpt, data = tiny
    plan = Partition(Placement.build(parse_cuts("2,3", 5), ["slow", "mid", "fast"]))
    devices = [
        Device("fast", 2.0, 64, 100, 1),
        Device("slow", 0.25, 64, 100, 1),
        Device("mid", 1.0, 64, 100, 1),
        Device("spare", 1.0, 64, 100, 1),
    ]
    settings = CalibrationSettings(
        ratios=FAST.ratios,
        runs=3,
        warmup=1,
        rounds=1,
        grid_limit=8,
        samples=12,
        batch_size=64,
        clock="cpu",
    )
    cal = calibrate(ckpt, data, plan=plan, devices=devices, settings=settings, progress=False)
    assert cal.plan_hash == plan.placement.placement_hash()
    assert [s.device for s in cal.slices] == ["slow", "mid", "fast"]
    measured = cal.meta["latency"]["measured_s"]
    assert measured == cal.meta["latency"]["cpu_s"] and cal.meta["latency"]["clock"] == "cpu"
    for s, m, factor in zip(cal.slices, measured, (4.0, 1.0, 0.5), strict=True):
        assert [t for _, t in s.points] == pytest.approx([factor * v for v in m])
    assert cal.meta["emulated"] is True and "speed scaling" in cal.meta["emulation"]
    assert len(cal.accuracy_points) == 12  # sampled: 27 grid points > grid_limit
    ratios = {r for r, _ in cal.accuracy_points}
    assert {(0.0,) * 3, (0.5,) * 3, (0.25,) * 3, (0.0, 0.0, 0.5)} <= ratios
    with pytest.raises(ConfigError, match="lacks"):
        calibrate(ckpt, data, plan=plan, devices=devices[:2], settings=settings, progress=False)


def test_calibrate_argument_errors(tiny: tuple[Checkpoint, ArrayDataset]) -> None:
    ckpt, data = tiny
    bounds = parse_cuts("2", 5)
    with pytest.raises(ConfigError, match="exactly one"):
        calibrate(ckpt, data, settings=FAST, progress=False)
    with pytest.raises(ConfigError, match="devices"):
        calibrate(
            ckpt,
            data,
            bounds=bounds,
            devices=[Device("d", 1, 1, 1, 0)],
            settings=FAST,
            progress=False,
        )
    with pytest.raises(ConfigError):
        CalibrationSettings(ratios=(0.1, 0.2))
    with pytest.raises(ConfigError):
        CalibrationSettings(runs=0)


def test_accuracy_fit_check_counts_falsely_feasible() -> None:
    fit = LogisticAccuracyFit(g=(-10.0,), d=-3.0, max_abs_error=0.0, lo=0.0, hi=1.0)
    points = [(0.0,), (0.5,)]
    pred = [fit.predict(np.asarray(p)) for p in points]
    check = accuracy_fit_check(points, [pred[0] - 0.2, pred[1]], fit, a_min=0.8)
    assert pred[0] > 0.8 > pred[0] - 0.2
    assert check["falsely_feasible"] == 1
    assert check["max_abs_error"] == pytest.approx(0.2)


def test_calibrate_cli(
    tmp_path: Path, tiny: tuple[Checkpoint, ArrayDataset], capsys: pytest.CaptureFixture[str]
) -> None:
    from PIL import Image

    ckpt, _ = tiny
    ckpt_path = save_checkpoint(ckpt, tmp_path / "tiny.pt")
    folder = tmp_path / "images"
    data = toy_dataset(80, seed=5)
    for i, (img, label) in enumerate(zip(data.images, data.labels, strict=True)):
        (folder / CLASSES[label]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / CLASSES[label] / f"{i}.png")
    devices = tmp_path / "devs.toml"
    devices.write_text(
        "".join(
            f'[[device]]\nname = "{n}"\nspeed = 0.5\nmemory_mb = 64\n'
            f"bandwidth_mbps = 100\nlatency_ms = 1\n"
            for n in ("x", "y")
        )
    )
    out = tmp_path / "cal.json"
    assert (
        cli_main(
            [
                "calibrate",
                "--checkpoint",
                str(ckpt_path),
                "--cuts",
                "3",
                "--devices",
                str(devices),
                "--dataset",
                str(folder),
                "--split",
                "test",
                "--ratios",
                "0,0.5",
                "--runs",
                "3",
                "--warmup",
                "1",
                "--limit",
                "6",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "R^2" in printed and "max abs error" in printed
    cal = Calibration.load(out)
    assert [s.device for s in cal.slices] == ["x", "y"]
    assert cal.plan_hash == plan_hash_of([SliceBounds(0, 3), SliceBounds(3, 5)], ["x", "y"])
    assert cal.meta["split"] == "test" and cal.meta["emulated"] is True
    assert cal.meta["samples"] == 6
    assert len(cal.accuracy_points) == 4
    assert out.with_suffix(".png").stat().st_size > 0
    plan_file = tmp_path / "plan.json"
    plan = Partition(Placement.build(parse_cuts("3", 5), ["x", "y"]))
    plan_file.write_text(json.dumps(plan.to_dict()))
    assert load_plan(plan_file).placement.nodes == ("x", "y")


def test_measured_accuracy_is_the_pipeline_run_at_those_levels(
    tmp_path: Path, tiny: tuple[Checkpoint, ArrayDataset]
) -> None:
    """The planner's measured veto (through accuracy_at_levels) measures what the nodes run,
    and remembers it in its cache file."""
    ckpt, data = tiny
    x, y = ckpt.preprocess(data.images), torch.from_numpy(data.labels)
    cache = tmp_path / "accuracy.json"
    veto = MeasuredAccuracy(SliceBank(ckpt, FAST.ratios), data, cache)
    pipe = ComposedPipeline(ckpt, parse_cuts("2", 5), ratios=FAST.ratios)
    for levels in [(0, 0), (1, 2), (2, 0)]:
        pipe.set_levels(levels)
        assert veto([(0, 2), (2, 5)], levels) == accuracy(pipe, x, y, batch_size=500)
    veto.save()
    again = MeasuredAccuracy(SliceBank(ckpt, FAST.ratios), data, cache)
    assert again.known == veto.known and len(again.known) == 3


def test_slimedge_importance_is_that_range_alone_pruned(
    tiny: tuple[Checkpoint, ArrayDataset],
) -> None:
    """A range's measured accuracy is the model with only that range pruned, the rest run as
    the nodes run it (kept channels and the upstream level passed on)."""
    ckpt, data = tiny
    ratios = (0.0, 0.5)
    m = slimedge_measure(ckpt, data, ratios=ratios, runs=2, warmup=0, combos=0, progress=False)
    x, y = ckpt.preprocess(data.images), torch.from_numpy(data.labels)
    row = m.range_index()
    pipe = ComposedPipeline(ckpt, parse_cuts("2", 5), ratios=ratios)
    pipe.set_levels((1, 0))  # [0, 2) pruned, [2, 5) not
    assert m.range_accuracy[row[(0, 2)], 1] == accuracy(pipe, x, y, batch_size=500)
    whole = ComposedPipeline(ckpt, parse_cuts("", 5), ratios=ratios)
    whole.set_levels((1,))
    assert m.range_accuracy[row[(0, 5)], 1] == accuracy(whole, x, y, batch_size=500)
    assert m.unpruned_accuracy == pytest.approx(m.range_accuracy[row[(0, 2)], 0])
