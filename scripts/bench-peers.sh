#!/usr/bin/env bash
# The peers the benchmark (benches/bench) compares proxypool's forward proxy with, each chaining to the same local
# upstream proxy (tinyproxy):
#   - squid, from Debian, configured by benches/bench/peers/squid.conf.template,
#   - proxy-chain (npm, pinned by benches/bench/peers/proxy-chain/package-lock.json), run by its server.js.
#
#   scripts/bench-peers.sh install   installs what is missing on a fresh Debian machine (apt: squid;
#                                    `npm ci` for proxy-chain), and nothing that is already there. Quiet then.
# tinyproxy comes with scripts/bootstrap.sh. Node.js >= 20.11 with npm must already be installed (proxy-chain needs it; Debian 12's own nodejs is 18).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
peers="$root/benches/bench/peers"
NODE_MIN="20.11"

. "$root/scripts/lib.sh"
# Installed as far as dpkg is concerned (squid lives in /usr/sbin, often not on a user's PATH).
deb_installed() { [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]; }

install() {
  local missing=() p
  for p in squid; do deb_installed "$p" || missing+=("$p"); done
  if [ ${#missing[@]} -gt 0 ]; then apt_install bench-peers "${missing[@]}"; fi

  command -v node >/dev/null && command -v npm >/dev/null || {
    echo "bench-peers: node and npm not found; install Node.js >= $NODE_MIN (e.g. from https://nodejs.org)" >&2; exit 1; }
  local have; have=$(node -p 'process.versions.node')
  if [ "$(printf '%s\n%s\n' "$NODE_MIN" "$have" | sort -V | head -n1)" != "$NODE_MIN" ]; then
    echo "bench-peers: node $have is too old for proxy-chain; install Node.js >= $NODE_MIN" >&2; exit 1
  fi

  # `npm ci` always wipes node_modules and reinstalls, so run it only when the lock file differs from the one the
  # last successful run installed (its hash is kept in node_modules/).
  local dir="$peers/proxy-chain" stamp sum
  stamp="$dir/node_modules/.bench-peers-lock.sha256"
  sum=$(sha256sum "$dir/package-lock.json" | cut -d' ' -f1)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$sum" ]; then
    echo "bench-peers: installing proxy-chain (npm ci) in $dir" >&2
    (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
    echo "$sum" >"$stamp"
  fi
}

case "${1:-}" in
  install) install ;;
  *) echo "usage: $0 install" >&2; exit 2 ;;
esac
