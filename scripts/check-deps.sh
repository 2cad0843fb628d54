#!/usr/bin/env bash
# Dependency arrows point down: no library crate (libs/*) may depend on a service crate (services/*), in any of its
# dependency kinds. Reads the workspace graph from `cargo metadata`; exits 1 naming each offending edge.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo metadata --format-version 1 --no-deps --locked | python3 -c "$(cat <<'PY'
import json, sys
meta = json.load(sys.stdin)
root = meta["workspace_root"]
def top(p):
    return p["manifest_path"][len(root) + 1:].split("/")[0]
services = {p["name"] for p in meta["packages"] if top(p) == "services"}
libs = [p for p in meta["packages"] if top(p) == "libs"]
bad = [
    "%s -> %s (%s)" % (p["name"], d["name"], d.get("kind") or "normal")
    for p in libs
    for d in p["dependencies"]
    if d["name"] in services
]
if bad:
    print("check-deps: libraries must not depend on services:", *bad, sep="\n  ", file=sys.stderr)
    sys.exit(1)
print("check-deps: %d libraries, none depends on a service" % len(libs))
PY
)"
