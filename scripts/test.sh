#!/usr/bin/env bash
# The test command: installs what is missing, then runs every test of the workspace. The integration tests start
# their own nats-server and SecantusDB on free ports with temporary storage; nothing else needs to be running.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
"$root/scripts/bootstrap.sh"
export PATH="$PATH:/usr/sbin"
cargo test --workspace --locked "$@"
