"""The SlimEdge parts of the command line, parsed without a broker: `edgeprune branch`,
`edgeprune fusion` (the multi-view topology) and `edgeprune controller --failover`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edgeprune.cli import build_parser, main
from edgeprune.commands import multiview
from edgeprune.commands.controller import build_failover

MV_CHECKPOINT = Path(__file__).resolve().parents[2] / "models" / "multiview-xs.pt"


def test_branch_and_fusion_parse_with_their_defaults() -> None:
    parser = build_parser()
    b = parser.parse_args(["branch", "--view", "2", "--pipe", "cams", "--port", "1884"])
    assert b.func is multiview.run_branch and b.view == 2 and b.node_id is None
    assert b.checkpoint == Path("models/multiview-xs.pt") and b.threads == 1
    assert b.pipe == "cams" and b.port == 1884
    f = parser.parse_args(
        ["fusion", "--timeout", "0.8", "--fail-after", "5", "--ratios", "0,0.25,0.5"]
    )
    assert f.func is multiview.run_fusion and f.timeout == 0.8 and f.fail_after == 5
    assert f.node_id == "fusion" and f.ratios == "0,0.25,0.5"
    with pytest.raises(SystemExit):
        parser.parse_args(["branch"])  # --view is required


def test_multiview_help_explains_the_topology(capsys) -> None:
    for command in ("branch", "fusion"):
        with pytest.raises(SystemExit) as exc:
            main([command, "--help"])
        assert exc.value.code == 0
        text = capsys.readouterr().out
        assert "control/view/<v>" in text and "element-wise max" in text
        assert "models/multiview-xs.pt" in text


def test_bad_fusion_settings_give_a_one_line_error(capsys) -> None:
    assert main(["--log-level", "WARNING", "fusion", "--timeout", "0"]) == 2
    assert "--timeout > 0" in capsys.readouterr().err


@pytest.mark.skipif(not MV_CHECKPOINT.exists(), reason="no multi-view checkpoint")
def test_a_view_the_checkpoint_lacks_is_a_one_line_error(capsys) -> None:
    code = main(
        ["--log-level", "WARNING", "branch", "--view", "7", "--checkpoint", str(MV_CHECKPOINT)]
    )
    assert code == 2 and "--view must be in [0, 3)" in capsys.readouterr().err


def test_controller_failover_options(tmp_path: Path) -> None:
    parser = build_parser()
    args = parser.parse_args(["controller", "--calibration", "cal.json", "--slo-ms", "200"])
    assert args.failover is None and build_failover(args) is None
    args = parser.parse_args(
        [
            "controller",
            "--calibration",
            "cal.json",
            "--failover",
            "devices.toml",
            "--heartbeat-timeout",
            "2.5",
            "--failover-check-interval",
            "0.1",
            "--build-grace",
            "20",
            "--failover-floor",
            "0.93",
            "--failover-slo-ms",
            "40",
            "--failover-objective",
            "expected",
            "--measurements",
            "m.json",
        ]
    )
    assert args.failover == Path("devices.toml") and args.heartbeat_timeout == 2.5
    assert args.failover_check_interval == 0.1 and args.build_grace == 20
    assert args.failover_floor == 0.93 and args.failover_slo_ms == 40
    assert args.failover_objective == "expected" and args.measurements == Path("m.json")
    assert args.failover_max_drop == 0.02
    with pytest.raises(SystemExit):  # one floor or the other
        parser.parse_args(
            [
                "controller",
                "--calibration",
                "c",
                "--failover-floor",
                "0.9",
                "--failover-max-drop",
                "0.01",
            ]
        )


def test_a_bad_heartbeat_setting_is_refused_before_anything_loads(tmp_path: Path) -> None:
    from pipeline.errors import ConfigError

    args = build_parser().parse_args(
        [
            "controller",
            "--calibration",
            "c",
            "--failover",
            str(tmp_path / "none.toml"),
            "--heartbeat-timeout",
            "0.1",
            "--failover-check-interval",
            "0.2",
        ]
    )
    with pytest.raises(ConfigError, match="check_interval_s < heartbeat_timeout_s"):
        build_failover(args)


def test_registering_the_slimedge_commands_imports_no_torch() -> None:
    """--help stays fast: branch, fusion, controller and plan import torch only when they run
    (checked in a fresh interpreter, on these modules only)."""
    code = (
        "import argparse, sys\n"
        "from edgeprune.commands import controller, multiview, plan\n"
        "sub = argparse.ArgumentParser().add_subparsers()\n"
        "for m in (controller, multiview, plan):\n"
        "    m.register(sub)\n"
        "print(sorted(m for m in ('torch', 'scipy') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert out.stdout.strip() == "[]", out.stderr
