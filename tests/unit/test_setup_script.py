"""scripts/setup.sh on a fresh Debian machine, with apt-get, sudo and the interpreters faked.

The script is sourced (which defines its functions and runs nothing), then one function is
called with fake commands first on PATH: they record their arguments, so no package is
installed and nothing is downloaded.
"""

from __future__ import annotations

import http.server
import os
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import REPO

SETUP = REPO / "scripts" / "setup.sh"


def _script(path: Path, body: str) -> Path:
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)
    return path


@pytest.fixture
def fake_bin(tmp_path: Path) -> Path:
    """apt-get and apt-cache that only log; sudo that runs its command."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "apt.log"
    _script(
        bin_dir / "apt-get",
        f'echo "$*" >> {log}\nif [ "$1" = install ]; then touch {tmp_path}/venv-installed; fi\n',
    )
    _script(bin_dir / "apt-cache", 'case "$2" in python3.*-venv) exit 0;; *) exit 100;; esac\n')
    _script(bin_dir / "sudo", 'exec "$@"\n')
    return bin_dir


def _fake_python(path: Path, tmp_path: Path, *, venv_works: bool) -> Path:
    """A python3 whose `-m venv DIR` fails the Debian way (a venv without pip, exit 1) until
    python3-venv is installed (the fake apt-get leaves a marker), and whose venvs log pip."""
    venv_python = (
        "#!/usr/bin/env bash\n"
        f'if [ "$1 $2" = "-m pip" ]; then echo "$*" >> {tmp_path}/pip.log; exit 0; fi\n'
        f'exec {sys.executable} "$@"\n'
    )
    ok = "true" if venv_works else f"[ -e {tmp_path}/venv-installed ]"
    return _script(
        path,
        'if [ "$1 $2" = "-m venv" ]; then\n'
        '    mkdir -p "$3/bin"\n'
        f"    if {ok}; then\n"
        f'        printf %s {shlex.quote(venv_python)} > "$3/bin/python"\n'
        '        chmod +x "$3/bin/python"\n'
        "        exit 0\n"
        "    fi\n"
        '    ln -s /bin/false "$3/bin/python"\n'
        '    echo "ensurepip is not available. On Debian/Ubuntu systems, you need to install'
        ' the python3-venv package" >&2\n'
        "    exit 1\n"
        "fi\n"
        'if [ "$1" = -c ]; then echo 3.11; exit 0; fi\n'
        "exit 2\n",
    )


def _run(call: str, fake_bin: Path, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {
        **os.environ,
        "PATH": f"{fake_bin}:{os.environ['PATH']}",
        "PYTHON": str(fake_bin / "python3"),
        "VENV": str(tmp_path / "venv"),
        **env,
    }
    return subprocess.run(
        ["bash", "-c", f"source {shlex.quote(str(SETUP))} && {call}"],
        env=full_env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_sourcing_runs_nothing(fake_bin: Path, tmp_path: Path) -> None:
    _fake_python(fake_bin / "python3", tmp_path, venv_works=True)
    run = _run("true", fake_bin, tmp_path)
    assert run.returncode == 0, run.stderr
    assert not (tmp_path / "venv").exists() and not (tmp_path / "apt.log").exists()


def test_failed_venv_installs_python3_venv_and_retries(fake_bin: Path, tmp_path: Path) -> None:
    _fake_python(fake_bin / "python3", tmp_path, venv_works=False)
    run = _run("create_venv", fake_bin, tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    apt = (tmp_path / "apt.log").read_text().splitlines()
    installs = [line.split() for line in apt if line.startswith("install")]
    assert len(installs) == 1 and {"python3-venv", "python3.11-venv"} <= set(installs[0])
    assert apt[0].startswith("update")  # the package lists first
    assert os.access(tmp_path / "venv" / "bin" / "python", os.X_OK)
    assert "ensurepip is not available" in run.stdout  # says why


def test_working_venv_installs_nothing(fake_bin: Path, tmp_path: Path) -> None:
    _fake_python(fake_bin / "python3", tmp_path, venv_works=True)
    run = _run("create_venv", fake_bin, tmp_path)
    assert run.returncode == 0, run.stderr
    assert not (tmp_path / "apt.log").exists()
    assert (tmp_path / "venv" / "bin" / "python").exists()


def test_failed_venv_without_apt_names_the_package(fake_bin: Path, tmp_path: Path) -> None:
    _fake_python(fake_bin / "python3", tmp_path, venv_works=False)
    run = _run("create_venv", fake_bin, tmp_path, EDGEPRUNE_NO_APT="1")
    assert run.returncode != 0
    assert "apt-get install python3-venv" in run.stderr
    assert not (tmp_path / "apt.log").exists()


@pytest.fixture
def torch_index(tmp_path: Path) -> Iterator[str]:
    """A local HTTP server standing in for the PyTorch CPU wheel index."""
    root = tmp_path / "index"
    (root / "torch").mkdir(parents=True)
    (root / "torch" / "index.html").write_text("<html></html>")

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(root), **kwargs)  # type: ignore[arg-type]

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _pip_calls(tmp_path: Path) -> list[list[str]]:
    log = tmp_path / "pip.log"
    return [line.split() for line in log.read_text().splitlines()] if log.exists() else []


def test_torch_comes_from_the_cpu_index_when_it_answers(
    fake_bin: Path, tmp_path: Path, torch_index: str
) -> None:
    _fake_python(fake_bin / "python3", tmp_path, venv_works=True)
    run = _run(
        "create_venv && install_torch", fake_bin, tmp_path, EDGEPRUNE_TORCH_INDEX=torch_index
    )
    assert run.returncode == 0, run.stdout + run.stderr
    calls = _pip_calls(tmp_path)
    assert len(calls) == 1, calls
    assert calls[0][2:] == ["install", "-q", "--index-url", torch_index, "torch==2.13.0"]


def test_torch_falls_back_to_the_default_index_quickly(fake_bin: Path, tmp_path: Path) -> None:
    """An index that refuses the connection (like this machine's, which cannot resolve the
    name): one install from the default index, without waiting for pip's retries."""
    _fake_python(fake_bin / "python3", tmp_path, venv_works=True)
    started = time.monotonic()
    run = _run(
        "create_venv && install_torch",
        fake_bin,
        tmp_path,
        EDGEPRUNE_TORCH_INDEX="http://127.0.0.1:9",
    )
    elapsed = time.monotonic() - started
    assert run.returncode == 0, run.stdout + run.stderr
    assert _pip_calls(tmp_path) == [["-m", "pip", "install", "-q", "torch==2.13.0"]]
    assert "did not answer" in run.stdout and "default index" in run.stdout
    assert elapsed < 10


def test_default_torch_index_is_the_pytorch_cpu_index() -> None:
    text = SETUP.read_text()
    assert "TORCH_VERSION=2.13.0\n" in text
    assert "EDGEPRUNE_TORCH_INDEX-https://download.pytorch.org/whl/cpu}" in text
