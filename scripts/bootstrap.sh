#!/usr/bin/env bash
# Installs what running and testing proxypool needs on a fresh Debian machine, and nothing that is already there:
#   - nats-server (Debian package) for the message bus,
#   - a pinned SecantusDB in .venv/ (a MongoDB wire-protocol server) for the database, since there is no mongod,
#   - a pinned schemathesis in .venv/, which services/gateway/tests/fuzz.rs runs against the live OpenAPI document.
# Rust (cargo) must already be installed.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
SECANTUS_VERSION="0.7.0b3"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
apt_install() {
  echo "bootstrap: installing $* with apt" >&2
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$@" >/dev/null
}

command -v cargo >/dev/null || { echo "bootstrap: cargo not found; install Rust (https://rustup.rs) first" >&2; exit 1; }

if ! command -v nats-server >/dev/null && [ ! -x /usr/sbin/nats-server ]; then
  apt_install nats-server
fi

venv="$root/.venv"
# `grep -x >/dev/null`, not `grep -q`: -q stops reading at the match, pip then fails on the closed pipe and
# pipefail made every run reinstall.
if ! "$venv/bin/python" -m pip show SecantusDB 2>/dev/null | grep -x "Version: $SECANTUS_VERSION" >/dev/null; then
  command -v python3 >/dev/null || apt_install python3
  if ! python3 -m venv "$venv" >/dev/null 2>&1; then
    apt_install python3-venv
    python3 -m venv "$venv"
  fi
  echo "bootstrap: installing SecantusDB==$SECANTUS_VERSION into $venv" >&2
  "$venv/bin/python" -m pip install -q "SecantusDB==$SECANTUS_VERSION"
fi
# nats-py, for the Python consumer example (examples/python/) and its test.
NATS_PY_VERSION="2.16.0"
if ! "$venv/bin/python" -m pip show nats-py 2>/dev/null | grep -x "Version: $NATS_PY_VERSION" >/dev/null; then
  echo "bootstrap: installing nats-py==$NATS_PY_VERSION into $venv" >&2
  "$venv/bin/python" -m pip install -q "nats-py==$NATS_PY_VERSION"
fi
# schemathesis, for the gateway's schema-driven fuzz test (services/gateway/tests/fuzz.rs). Pinned: its CLI flags and
# checks change between releases.
SCHEMATHESIS_VERSION="4.32.5"
if ! "$venv/bin/python" -m pip show schemathesis 2>/dev/null | grep -x "Version: $SCHEMATHESIS_VERSION" >/dev/null; then
  echo "bootstrap: installing schemathesis==$SCHEMATHESIS_VERSION into $venv" >&2
  "$venv/bin/python" -m pip install -q "schemathesis==$SCHEMATHESIS_VERSION"
fi
