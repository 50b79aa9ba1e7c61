#!/usr/bin/env bash
# Gateway RSS per idle logged-in connection, outside CI (issue 13): one node on its own Redis
# (free ports), N connections (default 5000) logged in to rooms of 50, RSS while they are held
# minus before they connected, per connection.
#
#   scripts/bench/idle-memory.sh GATEWAY_BIN LOADGEN_BIN OUT_DIR [N]
set -euo pipefail
GW=$(realpath "$1") LG=$(realpath "$2") OUT=$3 N=${4:-5000}
mkdir -p "$OUT"
cd "$OUT"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
RP=$(free_port) P=$(free_port) A=$(free_port)
redis-server --port "$RP" --bind 127.0.0.1 --save "" --appendonly no --daemonize no \
  --loglevel warning --maxclients 10000 >redis.log 2>&1 &
RPID=$!
GATEWAY_LISTEN=127.0.0.1:$P GATEWAY_ADMIN_LISTEN=127.0.0.1:$A \
  GATEWAY_REDIS_URL=redis://127.0.0.1:$RP/ GATEWAY_NODE_ID=node-0 \
  GATEWAY_MAX_CONNECTIONS=19500 RUST_LOG=warn "$GW" >gw.log 2>&1 &
GP=$!
trap 'kill $GP $RPID 2>/dev/null || true' EXIT
for _ in $(seq 100); do curl -sf "127.0.0.1:$A/healthz" >/dev/null && break; sleep 0.1; done
sleep 1
rss() { awk '/VmRSS/ {print $2}' /proc/$GP/status; }
R0=$(rss)
rm -f ready
"$LG" idle --url "ws://127.0.0.1:$P/ws" -c "$N" -d 8 --connect-rate 1000 --room-size 50 \
  --drain 0 --ready-file ready --json res.json --quiet >lg.log 2>&1 &
LGP=$!
while [ ! -e ready ] && kill -0 $LGP 2>/dev/null; do sleep 0.2; done
sleep 3
R1=$(rss)
wait $LGP || true
python3 -c "import json; r=json.load(open('res.json')); print({k: r.get(k) for k in ('connects', 'joined', 'max_open', 'connect_errors')})"
echo "gateway RSS before $R0 KiB, held $R1 KiB: $(( (R1 - R0) * 1024 / N )) bytes per connection"
