#!/usr/bin/env bash
# One-shot, idempotent set-up on a fresh Debian machine (`make` is the one prerequisite):
#   - from Debian, what is missing: python3, python3-venv (Debian ships `venv` without
#     ensurepip), Mosquitto and its clients, and docker-compose (the tests use it to check
#     docker-compose.yml),
#   - a virtual environment in .venv with torch==2.13.0, the CPU build, installed first: from
#     the PyTorch CPU wheel index when it answers within a few seconds, else from the default
#     index (PyPI and whatever pip is configured with; on x86_64 PyPI's torch is the CUDA build),
#   - edgeprune in editable mode with its dev extras,
#   - the default dataset (Animal-MNIST, taken from its PyPI wheel).
# A stamp file makes the second run take about a second.
#
# Environment: PYTHON (default python3), EDGEPRUNE_NO_APT=1 (never call apt-get),
# EDGEPRUNE_TORCH_INDEX (default https://download.pytorch.org/whl/cpu; empty: default index only).
# Sourcing this file defines the functions and runs nothing (tests/unit/test_setup_script.py).
set -euo pipefail

PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
STAMP=$VENV/.edgeprune-setup
TORCH_VERSION=2.13.0
TORCH_INDEX=${EDGEPRUNE_TORCH_INDEX-https://download.pytorch.org/whl/cpu}
INDEX_TIMEOUT_S=5 # the reachability check of TORCH_INDEX; a dead index costs no more

APT_UPDATED=0

need_root() { if [ "$(id -u)" -ne 0 ]; then echo sudo; fi; }

# apt_install PKG...: install Debian packages (once per run: apt-get update first).
apt_install() {
    if [ "${EDGEPRUNE_NO_APT:-0}" = 1 ]; then
        echo "setup: EDGEPRUNE_NO_APT=1, not installing $*: install them yourself" >&2
        return 1
    fi
    echo "setup: installing $* from Debian"
    if [ "$APT_UPDATED" = 0 ]; then
        $(need_root) apt-get update -qq
        APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive $(need_root) apt-get install -y -qq --no-install-recommends \
        "$@" >/dev/null
}

# The broker and its clients; docker-compose only to check docker-compose.yml in the tests
# (no Docker engine is needed). Python itself when $PY is missing.
install_system_packages() {
    local packages=()
    if ! command -v "$PY" >/dev/null 2>&1; then
        packages+=(python3 python3-venv)
    fi
    if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
        packages+=(mosquitto mosquitto-clients)
    fi
    if ! command -v docker-compose >/dev/null 2>&1; then
        packages+=(docker-compose)
    fi
    if [ ${#packages[@]} -gt 0 ]; then
        apt_install "${packages[@]}" || [ "${EDGEPRUNE_NO_APT:-0}" = 1 ]
    fi
}

# A usable venv has a pip. Debian's python3 without python3-venv fails in `-m venv` (no
# ensurepip) and leaves a venv without pip behind: remove it, install python3-venv, retry.
create_venv() {
    if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
        return 0
    fi
    echo "setup: creating $VENV"
    rm -rf "$VENV"
    local log
    log=$(mktemp)
    if "$PY" -m venv "$VENV" >"$log" 2>&1; then
        rm -f "$log"
        return 0
    fi
    rm -rf "$VENV"
    echo "setup: '$PY -m venv' failed: $(tail -n 3 "$log" | tr '\n' ' ')"
    rm -f "$log"
    local version
    version=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    local packages=(python3-venv)
    if apt-cache show "python$version-venv" >/dev/null 2>&1; then
        packages+=("python$version-venv")
    fi
    apt_install "${packages[@]}" || {
        echo "setup: cannot create $VENV: install ${packages[*]} (apt-get install ${packages[*]})" >&2
        return 1
    }
    "$PY" -m venv "$VENV"
}

# index_reachable URL: does URL answer (any HTTP status) within INDEX_TIMEOUT_S seconds?
index_reachable() {
    timeout $((INDEX_TIMEOUT_S + 2)) "$VENV/bin/python" - "$1" "$INDEX_TIMEOUT_S" <<'EOF' 2>/dev/null
import sys
import urllib.error
import urllib.request

try:
    urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2])).close()
except urllib.error.HTTPError:
    pass  # it answered
except OSError:
    sys.exit(1)
EOF
}

# torch==TORCH_VERSION, the CPU build: from TORCH_INDEX when it answers, else (or when the
# install from it fails) from the default index.
install_torch() {
    if [ -n "$TORCH_INDEX" ] && index_reachable "$TORCH_INDEX/torch/"; then
        echo "setup: installing torch==$TORCH_VERSION (CPU build) from $TORCH_INDEX"
        if "$VENV/bin/python" -m pip install -q --index-url "$TORCH_INDEX" "torch==$TORCH_VERSION"; then
            return 0
        fi
        echo "setup: installing torch from $TORCH_INDEX failed; trying the default index"
    elif [ -n "$TORCH_INDEX" ]; then
        echo "setup: the PyTorch CPU index $TORCH_INDEX did not answer within ${INDEX_TIMEOUT_S} s"
    fi
    echo "setup: installing torch==$TORCH_VERSION from the default index (on x86_64, PyPI's" \
        "build is the CUDA one, several GB; a local CPU wheel is taken when pip is configured with one)"
    "$VENV/bin/python" -m pip install -q "torch==$TORCH_VERSION"
}

main() {
    cd "$(dirname "${BASH_SOURCE[0]}")/.."
    install_system_packages

    # The stamp records the hash of pyproject.toml: a changed dependency list re-runs pip.
    local want
    want="$(sha256sum pyproject.toml | cut -c1-16)"
    if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x "$VENV/bin/edgeprune" ]; then
        :
    else
        create_venv
        if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('$TORCH_VERSION') else 1)" 2>/dev/null; then
            install_torch
        fi
        echo "setup: installing edgeprune (editable, dev extras)"
        "$VENV/bin/python" -m pip install -q -e ".[dev]"
        echo "$want" >"$STAMP"
    fi

    "$VENV/bin/edgeprune" data fetch --quiet
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    main "$@"
fi
