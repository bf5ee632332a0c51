"""What a new user on a fresh Debian machine reads: README's set-up and the broker examples."""

from __future__ import annotations

import re
from pathlib import Path

from tests.helpers import REPO

README = REPO / "README.md"
STOP_SYSTEM_BROKER = "systemctl disable --now mosquitto"


def _docs() -> list[Path]:
    return [README, REPO / "broker" / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def test_readme_names_make_as_the_one_prerequisite() -> None:
    text = " ".join(README.read_text().split())
    assert "The one prerequisite is `make` (`apt-get install make`" in text


def test_readme_says_where_torch_comes_from() -> None:
    text = " ".join(README.read_text().split())
    assert "https://download.pytorch.org/whl/cpu" in text
    assert "`torch==2.13.0` from the default index" in text


def test_hand_run_pipeline_avoids_the_debian_broker_port() -> None:
    """Debian's mosquitto package starts a system broker on 1883; the hand-run example must
    not collide with it, and every client must find the example's broker."""
    text = README.read_text()
    block = text.split("A pipeline by hand", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    broker = re.search(r"^edgeprune broker --port (\d+)$", block, re.M)
    assert broker is not None, block
    port = broker.group(1)
    assert port != "1883"
    assert f"export EDGEPRUNE_MQTT_PORT={port}" in block


def test_every_host_listener_on_1883_says_how_to_stop_the_system_broker() -> None:
    """A doc showing a command that listens on the host's 1883 tells how to free the port."""
    listens_on_1883 = re.compile(
        r"^(edgeprune broker( |$)(?!.*--(port|secure|print-config))"
        r"|mosquitto -c broker/dev\.conf"
        r"|docker run .*-p 127\.0\.0\.1:1883:1883"
        r"|edgeprune broker --port 1883)",
        re.M,
    )
    for path in _docs():
        text = path.read_text()
        commands = "\n".join(line.strip() for line in text.splitlines())
        if listens_on_1883.search(commands):
            assert STOP_SYSTEM_BROKER in text, path.relative_to(REPO)
