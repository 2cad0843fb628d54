#!/usr/bin/env bash
# Runs the whole system on this machine without Docker: NATS with JetStream, a local MongoDB-protocol server
# (SecantusDB) with its data under var/, and every service. Ctrl-C stops everything.
#
# Settings come from .env when present, else from .env.example. With SEED_DEMO=1 (the default) an empty database
# gets one demo provider, package and proxy so that /api/get-proxy answers at once.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
"$root/scripts/bootstrap.sh"
export PATH="$PATH:/usr/sbin"

envfile=.env; [ -f "$envfile" ] || envfile=.env.example
set -a; . "./$envfile"; set +a
: "${PORT:=33033}" "${NATS_URL:=nats://127.0.0.1:14222}" "${MONGODB_URI:=mongodb://127.0.0.1:27027/?directConnection=true}"
nats_port=${NATS_URL##*:}; nats_port=${nats_port%%/*}
mongo_port=$(echo "$MONGODB_URI" | sed -E 's#^mongodb://([^@/]*@)?[^:/]+:([0-9]+).*#\2#')

mkdir -p var/nats var/mongo var/log
pids=()
cleanup() { trap - EXIT INT TERM; echo; echo "run: stopping"; kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

wait_port() { for _ in $(seq 1 200); do (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; echo "run: nothing listens on $1 ($2); see var/log/" >&2; exit 1; }

echo "run: building the services (release)…"
cargo build --release --locked -p proxypool-lease -p proxypool-auth -p proxypool-rotator -p proxypool-importer -p proxypool-gateway

.venv/bin/nats-server -a 127.0.0.1 -p "$nats_port" -js -sd var/nats >var/log/nats.log 2>&1 & pids+=($!)
wait_port "$nats_port" nats-server
.venv/bin/secantusd-py --host 127.0.0.1 --port "$mongo_port" --storage-path var/mongo --log-level WARNING >var/log/mongo.log 2>&1 & pids+=($!)
wait_port "$mongo_port" secantusd

export NATS_URL MONGODB_URI PORT
target/release/proxypool-lease >var/log/lease.log 2>&1 & pids+=($!)
target/release/proxypool-auth >var/log/auth.log 2>&1 & pids+=($!)
target/release/proxypool-rotator >var/log/rotator.log 2>&1 & pids+=($!)
target/release/proxypool-importer >var/log/importer.log 2>&1 & pids+=($!)
target/release/proxypool-gateway >var/log/gateway.log 2>&1 & pids+=($!)
wait_port "$PORT" proxypool-gateway

api="http://127.0.0.1:$PORT"
# Admin writes wait for the lease service (they sync to it): wait until a lease leader answers (an empty pool says
# no_proxy_available, which proves it), at most 30 s.
for _ in $(seq 150); do
  curl -sS -H "Authorization: $ALLOWED_API_KEY" "$api/api/get-proxy?area=vn" 2>/dev/null | grep -q '"no_proxy_available"\|"key"' && break
  sleep 0.2
done
if [ "${SEED_DEMO:-1}" = 1 ]; then
  total=$(curl -fsS -H "Authorization: $ALLOWED_API_KEY" "$api/api/proxies?limit=1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["total"])')
  if [ "$total" = 0 ]; then
    post() { curl -fsS -X POST -H "Authorization: $ALLOWED_API_KEY" -H 'Content-Type: application/json' "$api$1" -d "$2"; }
    id() { python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])'; }
    provider=$(post /api/proxy_providers '{"name":"Demo","account":"demo","domain":"https://demo.invalid"}' | id)
    package=$(post /api/proxy_packages "{\"code\":\"DEMO\",\"name\":\"Demo package\",\"price\":0,\"proxy_provider_id\":\"$provider\"}" | id)
    post /api/proxies "{\"ip\":\"127.0.0.1\",\"port\":3128,\"username\":\"demo\",\"password\":\"demo\",\"area\":\"vn\",\"rotate_url\":\"http://127.0.0.1:9/rotate\",\"proxy_package_id\":\"$package\"}" >/dev/null
    echo "run: seeded a demo proxy in area vn"
  fi
fi

cat <<MSG

proxypool is up. API: $api   Swagger: $api/swagger/   (logs: var/log/, data: var/)
  curl -H "Authorization: $ALLOWED_API_KEY" "$api/api/get-proxy?area=vn"
Press Ctrl-C to stop.
MSG
wait -n "${pids[@]}"
echo "run: a process exited; see var/log/" >&2
