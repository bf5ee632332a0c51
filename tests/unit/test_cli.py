"""The ``edgeprune`` command line, run in-process through ``main(argv)``: help, a quick
training run, ``prune-curve`` on its checkpoint, and clean one-line errors."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from edgeprune.cli import main
from pipeline.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[2]
DATA_DIR = Path(os.environ.get("EDGEPRUNE_DATA_DIR", REPO / "data"))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RATIOS = "0,0.3,0.5"

needs_data = pytest.mark.skipif(
    not (DATA_DIR / "animal_mnist.npz").exists(),
    reason="Animal-MNIST is not cached (run `edgeprune data fetch`)",
)


def _run(*argv: str) -> int:
    return main(["--log-level", "WARNING", *argv])


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A resnet-xs checkpoint from one quick epoch on 300 images (the standard regime: the
    width-robust default trains several sub-networks per step and is several times slower)."""
    if not (DATA_DIR / "animal_mnist.npz").exists():
        pytest.skip("Animal-MNIST is not cached (run `edgeprune data fetch`)")
    out = tmp_path_factory.mktemp("cli") / "xs.pt"
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        code = _run(
            "train",
            "--regime",
            "standard",
            "--epochs",
            "1",
            "--limit",
            "300",
            "--model",
            "resnet-xs",
            "--data-dir",
            str(DATA_DIR),
            "--out",
            str(out),
        )
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    assert code == 0
    return out


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        _run("--help")
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for command in ("data", "train", "prune-curve", "bench"):
        assert command in out, command


def test_bench_help_lists_prune(capsys):
    with pytest.raises(SystemExit) as exc:
        _run("bench", "--help")
    assert exc.value.code == 0
    assert "prune" in capsys.readouterr().out


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "usage: edgeprune" in capsys.readouterr().out


@needs_data
def test_train_writes_a_loadable_checkpoint(trained, capsys):
    ckpt = load_checkpoint(trained)
    assert ckpt.config.name == "resnet-xs"
    assert ckpt.train["config"]["epochs"] == 1
    assert 0.0 <= ckpt.metrics["test_acc"] <= 1.0
    assert ckpt.calibration_images is not None and len(ckpt.calibration_images) > 0
    assert ckpt.build().num_blocks == 5


@needs_data
def test_prune_curve_prints_one_json_object_and_writes_files(trained, tmp_path, capsys):
    out = tmp_path / "pc"
    code = _run(
        "prune-curve",
        str(trained),
        "--ratios",
        RATIOS,
        "--data-dir",
        str(DATA_DIR),
        "--json",
        "--out",
        str(out),
    )
    assert code == 0
    stdout = capsys.readouterr().out
    assert stdout.count("\n") == 1  # exactly one line: one JSON object
    report = json.loads(stdout)
    assert isinstance(report, dict)
    ratios = [f"{float(r):g}" for r in RATIOS.split(",")]
    assert list(report["accuracy_by_ratio"]) == ratios
    assert all(0.0 <= a <= 1.0 for a in report["accuracy_by_ratio"].values())
    assert report["ratios"] == [float(r) for r in RATIOS.split(",")]
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["accuracy_by_ratio"] == report["accuracy_by_ratio"]
    assert out.with_suffix(".png").read_bytes()[:8] == PNG_MAGIC
    assert report["files"] == {
        "json": str(out.with_suffix(".json")),
        "png": str(out.with_suffix(".png")),
    }


def _one_line_error(capsys: pytest.CaptureFixture[str], command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith(f"edgeprune {command}: error: "), err
    return err


@needs_data
def test_bad_cut_points_give_a_one_line_error(trained, tmp_path, capsys):
    code = _run(
        "prune-curve",
        str(trained),
        "--cuts",
        "3,1",
        "--ratios",
        RATIOS,
        "--data-dir",
        str(DATA_DIR),
        "--out",
        str(tmp_path / "pc"),
    )
    assert code == 2
    assert "cut points" in _one_line_error(capsys, "prune-curve")


def test_a_missing_checkpoint_gives_a_one_line_error(tmp_path, capsys):
    code = _run(
        "bench", "prune", "--checkpoint", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "b")
    )
    assert code == 2
    assert "does not exist" in _one_line_error(capsys, "bench")


@needs_data
def test_bad_bench_cuts_give_a_one_line_error(trained, tmp_path, capsys):
    code = _run(
        "bench",
        "prune",
        "--checkpoint",
        str(trained),
        "--cuts",
        "0,9",
        "--out",
        str(tmp_path / "b"),
    )
    assert code == 2
    assert "cut points" in _one_line_error(capsys, "bench")


@needs_data
def test_bad_model_widths_give_a_one_line_error(tmp_path, capsys):
    code = _run(
        "train",
        "--model",
        "resnet-xs",
        "--widths",
        "16,0,64",
        "--data-dir",
        str(DATA_DIR),
        "--out",
        str(tmp_path / "m.pt"),
    )
    assert code == 2
    assert "positive" in _one_line_error(capsys, "train")
    assert not (tmp_path / "m.pt").exists()


def test_an_argparse_type_error_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        _run("bench", "prune", "--repeats", "3")
    assert exc.value.code == 2
    assert "--repeats" in capsys.readouterr().err


def _tiny_bench_prune(checkpoint: Path, out: Path) -> list[str]:
    """``bench prune`` on two slices with few timed calls: seconds, not minutes."""
    return [
        *("bench", "prune", "--checkpoint", str(checkpoint), "--cuts", "2"),
        *("--repeats", "10", "--switch-runs", "100", "--switch-trials", "10", "--out", str(out)),
    ]


@needs_data
def test_bench_prune_json_has_the_headline_and_a_row_per_slice_and_level(trained, tmp_path, capsys):
    out = tmp_path / "bp"
    code = _run(*_tiny_bench_prune(trained, out), "--json")
    assert code == 0
    stdout = capsys.readouterr().out
    assert stdout.count("\n") == 1
    report = json.loads(stdout)
    for key in ("speedup_at_0.3", "mac_reduction_at_0.3", "switch_ms"):
        assert isinstance(report[key], float) and report[key] > 0, key
    assert report["mac_reduction_at_0.3"] > 1.0
    assert report["goal_met"] and all(isinstance(v, bool) for v in report["goal_met"].values())
    levels = len(report["ratios"])
    assert len(report["slices"]) == 2 * levels and len(report["whole"]) == levels
    assert {(r["slice"], r["level"]) for r in report["slices"]} == {
        (i, lv) for i in range(2) for lv in range(levels)
    }
    level0 = [r for r in report["slices"] if r["level"] == 0]
    assert all(r["speedup"] == 1.0 and r["mac_reduction"] == 1.0 for r in level0)
    assert report["whole"][0]["macs"] == sum(r["macs"] for r in level0)
    assert report["startup"]["total_with_bn_s"] > 0
    assert out.with_suffix(".png").read_bytes()[:8] == PNG_MAGIC
    assert json.loads(out.with_suffix(".json").read_text())["switch_ms"] == report["switch_ms"]


def test_train_help_constants_match_the_training_code() -> None:
    from edgeprune.commands import train
    from pipeline.models import PRESETS
    from pipeline.training import DEFAULT_REGIME, REGIMES

    assert train.DEFAULT_REGIME == DEFAULT_REGIME
    assert tuple(sorted(REGIMES)) == train.REGIME_NAMES
    assert tuple(sorted(PRESETS)) == train.MODEL_PRESETS
    assert (
        "; ".join(
            f"{name}: {c.epochs} epochs, batch {c.batch_size}, weight decay {c.weight_decay:g}"
            + (", width-robust" if c.width_robust else "")
            for name, c in REGIMES.items()
        )
        == train.REGIME_SUMMARY
    )


def test_help_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys; from edgeprune.cli import build_parser; build_parser(); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@needs_data
def test_bench_prune_check_exits_1_and_names_a_missed_goal(trained, tmp_path, capsys):
    """A switch can never take 0 ms: with that target --check fails and names switch_ms;
    without --check the same run exits 0."""
    argv = [*_tiny_bench_prune(trained, tmp_path / "bp"), "--goal", "switch_ms=0"]
    assert _run(*argv, "--check") == 1
    captured = capsys.readouterr()
    assert captured.err.startswith("edgeprune bench prune: goal missed:")
    assert "switch_ms = " in captured.err and "(goal <= 0): NOT met" in captured.err
    assert "speedup_over_mac_at_0.3 = " in captured.out
    assert _run(*argv) == 0
    assert "switch_ms = " in capsys.readouterr().out
