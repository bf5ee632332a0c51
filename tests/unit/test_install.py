"""A non-editable install (`pip install .`) finds the default model outside the repository.

The project is copied the way the Dockerfile copies it (the packages, pyproject.toml, README
and models/resnet-s.pt; also the broker configs and the scenarios), installed with `pip install --no-deps --no-build-isolation --target`
(the dependencies, torch included, come from this venv), and run from an empty directory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.checkpoint import load_checkpoint
from tests.helpers import REPO

PACKAGES = (
    "pipeline",
    "bus",
    "nodes",
    "controller",
    "traces",
    "broker",
    "experiment",
    "bench",
    "edgeprune",
)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project installed (not editable) into a fresh target directory."""
    root = tmp_path_factory.mktemp("install")
    source = root / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in PACKAGES:
        shutil.copytree(REPO / name, source / name, symlinks=True, ignore=ignore)
    (source / "models").mkdir()
    shutil.copy2(REPO / "models" / "resnet-s.pt", source / "models" / "resnet-s.pt")
    target = root / "site"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(target),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return target


def _run(installed: Path, cwd: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEPRUNE_")}
    env["PYTHONPATH"] = str(installed)  # before this venv's editable install of the repo
    return subprocess.run([*argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_the_wheel_carries_only_the_default_model(installed: Path) -> None:
    shipped = sorted(p.relative_to(installed) for p in installed.rglob("*.pt"))
    assert shipped == [Path("pipeline/default_model/resnet-s.pt")]
    packaged = installed / "pipeline" / "default_model" / "resnet-s.pt"
    assert not packaged.is_symlink()  # a copy, not the checkout's link
    assert packaged.read_bytes() == (REPO / "models" / "resnet-s.pt").read_bytes()


def test_default_model_resolves_outside_the_repository(installed: Path, tmp_path: Path) -> None:
    code = (
        "import json, pipeline; from pipeline.checkpoint import DEFAULT_CHECKPOINT as d, "
        "load_checkpoint; c = load_checkpoint(); "
        "print(json.dumps([pipeline.__file__, str(d), str(c.path), c.model_hash()]))"
    )
    proc = _run(installed, tmp_path, sys.executable, "-c", code)
    assert proc.returncode == 0, proc.stderr
    module, default, loaded, model_hash = json.loads(proc.stdout)
    assert Path(module).is_relative_to(installed)  # the installed copy, not the checkout
    assert Path(default).is_relative_to(installed) and loaded == default
    assert model_hash == load_checkpoint(REPO / "models" / "resnet-s.pt").model_hash()


def test_broker_configs_and_demo_scenario_ship(installed: Path, tmp_path: Path) -> None:
    confs = sorted(p.name for p in (installed / "broker").glob("*.conf"))
    assert confs == sorted(p.name for p in (REPO / "broker").glob("*.conf"))
    assert (installed / "experiment" / "scenarios" / "demo.toml").is_file()
    code = (
        "import json; from broker.launcher import DEV_CONFIG; "
        "from edgeprune.commands.demo import DEMO_CONFIG; "
        "print(json.dumps([str(DEV_CONFIG), str(DEMO_CONFIG)]))"
    )
    proc = _run(installed, tmp_path, sys.executable, "-c", code)
    assert proc.returncode == 0, proc.stderr
    assert all(Path(p).is_relative_to(installed) for p in json.loads(proc.stdout))
    printed = _run(
        installed, tmp_path, str(installed / "bin" / "edgeprune"), "broker", "--print-config"
    )
    assert printed.returncode == 0, printed.stderr
    assert "listener 1883 127.0.0.1" in printed.stdout


@pytest.mark.slow  # profiles every block of the model: several seconds
def test_installed_cli_loads_the_default_model(installed: Path, tmp_path: Path) -> None:
    out = tmp_path / "profile.json"
    proc = _run(
        installed,
        tmp_path,
        str(installed / "bin" / "edgeprune"),
        "profile",
        "--runs",
        "2",
        "--warmup",
        "1",
        "--json",
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.splitlines()[-1])
    assert Path(report["model"]["source"]).is_relative_to(installed)
    assert report["model"]["hash"] == load_checkpoint(REPO / "models" / "resnet-s.pt").model_hash()
    assert out.is_file()
