#!/usr/bin/env bash
# Runs the whole system on this machine without Docker: NATS with JetStream, a local MongoDB-protocol server
# (SecantusDB) with its data under var/, and every service. Ctrl-C stops everything.
#
# Settings come from .env when present, else from .env.example. With SEED_DEMO=1 (the default) the outside world is
# local too, so that everything works offline: two upstream proxies (tinyproxy with basic auth), a demo provider
# (rotate URL, IP echo, geo-IP) and a target site (examples/demo-world); an empty database gets a demo provider,
# package and the two proxies, so that /api/get-proxy and the forward door answer at once, and rotation succeeds.
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
cargo build --release --locked -p proxypool-lease -p proxypool-auth -p proxypool-rotator -p proxypool-importer \
  -p proxypool-gateway -p proxypool-forward -p demo-world
bin=${CARGO_TARGET_DIR:-target}/release

demo=${SEED_DEMO:-1}
# The local outside world's ports.
DEMO_PROVIDER=127.0.0.1:33090 DEMO_TARGET=127.0.0.1:33091 DEMO_UPSTREAMS="33092 33093"
if [ "$demo" = 1 ]; then
  "$bin"/proxypool-demo-world "$DEMO_PROVIDER" "$DEMO_TARGET" >var/log/demo-world.log 2>&1 & pids+=($!)
  mkdir -p var/demo
  for p in $DEMO_UPSTREAMS; do
    printf 'Port %s\nListen 127.0.0.1\nTimeout 600\nMaxClients 1000\nLogLevel Warning\nBasicAuth demo demo-pass\n' "$p" >"var/demo/tinyproxy-$p.conf"
    tinyproxy -d -c "var/demo/tinyproxy-$p.conf" >"var/log/tinyproxy-$p.log" 2>&1 & pids+=($!)
  done
  # The rotator checks each new IP through the proxy; offline, against the demo provider's echo.
  export IP_CHECK_URLS="http://$DEMO_PROVIDER/ip" IP_REGION_URL="http://$DEMO_PROVIDER/region/{ip}"
fi

.venv/bin/nats-server -a 127.0.0.1 -p "$nats_port" -js -sd var/nats >var/log/nats.log 2>&1 & pids+=($!)
wait_port "$nats_port" nats-server
.venv/bin/secantusd-py --host 127.0.0.1 --port "$mongo_port" --storage-path var/mongo --log-level WARNING >var/log/mongo.log 2>&1 & pids+=($!)
wait_port "$mongo_port" secantusd

export NATS_URL MONGODB_URI PORT
"$bin"/proxypool-lease >var/log/lease.log 2>&1 & pids+=($!)
"$bin"/proxypool-auth >var/log/auth.log 2>&1 & pids+=($!)
"$bin"/proxypool-rotator >var/log/rotator.log 2>&1 & pids+=($!)
"$bin"/proxypool-importer >var/log/importer.log 2>&1 & pids+=($!)
"$bin"/proxypool-gateway >var/log/gateway.log 2>&1 & pids+=($!)
"$bin"/proxypool-forward >var/log/forward.log 2>&1 & pids+=($!)
wait_port "$PORT" proxypool-gateway
door_http=${FORWARD_HTTP_ADDR:-0.0.0.0:33080}; door_http=127.0.0.1:${door_http##*:}
door_socks=${FORWARD_SOCKS_ADDR:-0.0.0.0:33081}; door_socks=127.0.0.1:${door_socks##*:}
wait_port "${door_http##*:}" proxypool-forward

api="http://127.0.0.1:$PORT"
# Admin writes wait for the lease service (they sync to it): wait until a lease leader answers (an empty pool says
# no_proxy_available, which proves it), at most 30 s.
for _ in $(seq 150); do
  curl -sS -H "Authorization: $ALLOWED_API_KEY" "$api/api/get-proxy?area=vn" 2>/dev/null | grep -q '"no_proxy_available"\|"key"' && break
  sleep 0.2
done
if [ "$demo" = 1 ]; then
  for p in $DEMO_UPSTREAMS; do wait_port "$p" tinyproxy; done
  wait_port "${DEMO_TARGET##*:}" proxypool-demo-world
  total=$(curl -fsS -H "Authorization: $ALLOWED_API_KEY" "$api/api/proxies?limit=1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["total"])')
  if [ "$total" = 0 ]; then
    post() { curl -fsS -X POST -H "Authorization: $ALLOWED_API_KEY" -H 'Content-Type: application/json' "$api$1" -d "$2"; }
    id() { python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])'; }
    provider=$(post /api/proxy_providers '{"name":"Demo","account":"demo","domain":"https://demo.invalid"}' | id)
    package=$(post /api/proxy_packages "{\"code\":\"DEMO\",\"name\":\"Demo package\",\"price\":0,\"proxy_provider_id\":\"$provider\"}" | id)
    for p in $DEMO_UPSTREAMS; do
      post /api/proxies "{\"ip\":\"127.0.0.1\",\"port\":$p,\"username\":\"demo\",\"password\":\"demo-pass\",\"area\":\"vn\",\"rotate_url\":\"http://$DEMO_PROVIDER/rotate/demo-$p\",\"rotate_time\":300,\"proxy_package_id\":\"$package\"}" >/dev/null
    done
    echo "run: seeded two demo proxies in area vn (local tinyproxy upstreams, rotated through the local demo provider)"
  fi
fi

cat <<MSG

proxypool is up. API: $api   Swagger: $api/swagger/   (logs: var/log/, data: var/)
  curl -H "Authorization: $ALLOWED_API_KEY" "$api/api/get-proxy?area=vn"
The pool as one proxy (HTTP door $door_http, SOCKS5 door $door_socks):
  curl -x "http://demo:$ALLOWED_API_KEY@$door_http" http://$DEMO_TARGET/
  curl --socks5-hostname $door_socks --proxy-user "demo-session-s1:$ALLOWED_API_KEY" http://$DEMO_TARGET/
Press Ctrl-C to stop.
MSG
wait -n "${pids[@]}"
echo "run: a process exited; see var/log/" >&2
