#!/usr/bin/env bash
# One-shot, idempotent set-up on a fresh Debian machine:
#   - Mosquitto and its clients from Debian when `mosquitto` is missing (and docker-compose,
#     which the tests use to check docker-compose.yml),
#   - a virtual environment in .venv with torch==2.13.0 (CPU) installed first,
#   - edgeprune in editable mode with its dev extras,
#   - the default dataset (Animal-MNIST, taken from its PyPI wheel).
# A stamp file makes the second run take about a second.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.edgeprune-setup
TORCH_VERSION=2.13.0

need_root() { if [ "$(id -u)" -ne 0 ]; then echo sudo; fi; }

# Debian packages: the broker and its clients; docker-compose only to check docker-compose.yml
# in the tests (no Docker engine is needed). EDGEPRUNE_NO_APT=1 skips this step.
packages=()
if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
    packages+=(mosquitto mosquitto-clients)
fi
if ! command -v docker-compose >/dev/null 2>&1; then
    packages+=(docker-compose)
fi
if [ ${#packages[@]} -gt 0 ] && [ "${EDGEPRUNE_NO_APT:-0}" != 1 ]; then
    echo "setup: installing ${packages[*]} from Debian"
    $(need_root) apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $(need_root) apt-get install -y -qq --no-install-recommends \
        "${packages[@]}" >/dev/null
fi

# The stamp records the hash of pyproject.toml: a changed dependency list re-runs pip.
want="$(sha256sum pyproject.toml | cut -c1-16)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x "$VENV/bin/edgeprune" ]; then
    :
else
    if [ ! -x "$VENV/bin/python" ]; then
        echo "setup: creating $VENV"
        "$PY" -m venv "$VENV"
    fi
    if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('$TORCH_VERSION') else 1)" 2>/dev/null; then
        echo "setup: installing torch==$TORCH_VERSION (CPU) first"
        "$VENV/bin/pip" install -q "torch==$TORCH_VERSION"
    fi
    echo "setup: installing edgeprune (editable, dev extras)"
    "$VENV/bin/pip" install -q -e ".[dev]"
    echo "$want" > "$STAMP"
fi

"$VENV/bin/edgeprune" data fetch --quiet
