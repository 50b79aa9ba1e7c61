#!/usr/bin/env bash
# A quick A/B of the delivery path, outside CI (issue 13): 3 gateway nodes + their own Redis on
# free ports, a room of 1000 members spread over the nodes, 3 senders; prints the server CPU
# (every thread of the nodes and of Redis, from /proc/*/task/*/schedstat, which counts exact
# run time rather than 10 ms ticks) per delivery over the measured phase, deliveries counted
# by the nodes' own gateway_messages_delivered_total.
#
#   scripts/bench/delivery-ab.sh GATEWAY_BIN LOADGEN_BIN OUT_DIR chat|saturation|floor [perf]
#
# chat: 20 msg/s for 20 s (20k deliveries/s); saturation: closed loop, 16 in flight per sender,
# 10 s (WINDOW=n for another window); floor: a room of 10 at 100 msg/s, 10 s (latency). With `perf`, the nodes are profiled for 10 s of the phase (OUT_DIR/perf.data).
# The suite's peers run (`loadgen suite --only peers`) is the reference; this script is for
# comparing two builds quickly, one after the other, on the same machine.
set -euo pipefail
GW=$(realpath "$1") LG=$(realpath "$2") OUT=$3 MODE=$4 PERF=${5:-}
mkdir -p "$OUT"
cd "$OUT"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
RP=$(free_port)
redis-server --port "$RP" --bind 127.0.0.1 --save "" --appendonly no --daemonize no \
  --loglevel warning --maxclients 10000 >redis.log 2>&1 &
PIDS=($!)
URLS="" ADMINS=()
for k in 0 1 2; do
  P=$(free_port) A=$(free_port)
  GATEWAY_LISTEN=127.0.0.1:$P GATEWAY_ADMIN_LISTEN=127.0.0.1:$A \
    GATEWAY_REDIS_URL=redis://127.0.0.1:$RP/ GATEWAY_NODE_ID=node-$k \
    GATEWAY_MAX_CONNECTIONS=19500 RUST_LOG=warn "$GW" >"gw$k.log" 2>&1 &
  PIDS+=($!)
  URLS="$URLS,ws://127.0.0.1:$P/ws"
  ADMINS+=("$A")
done
trap 'kill "${PIDS[@]}" 2>/dev/null || true' EXIT
for A in "${ADMINS[@]}"; do
  for _ in $(seq 100); do curl -sf "127.0.0.1:$A/healthz" >/dev/null && break; sleep 0.1; done
done
cpu_ns() {
  local t=0 f
  for p in "${PIDS[@]}"; do
    for f in /proc/"$p"/task/*/schedstat; do t=$((t + $(cut -d' ' -f1 "$f"))); done
  done
  echo "$t"
}
delivered() {
  local t=0 A
  for A in "${ADMINS[@]}"; do
    t=$((t + $(curl -s "127.0.0.1:$A/metrics" | awk '/^gateway_messages_delivered_total/ {printf "%d", $2}')))
  done
  echo "$t"
}
case "$MODE" in
  chat) ARGS=(-c 1000 -d 20 --rate 20) ;;
  saturation) ARGS=(-c 1000 -d 10 --rate 0 --window "${WINDOW:-16}") ;;
  # The latency floor: a room of 10 at 100 messages/s.
  floor) ARGS=(-c 10 -d 10 --rate 100) ;;
  *) echo "mode: chat, saturation or floor" >&2; exit 64 ;;
esac
rm -f ready drained
"$LG" bigroom --url "${URLS#,}" "${ARGS[@]}" --senders 3 --connect-rate 500 --drain 3 \
  --json res.json --ready-file ready --drained-file drained --quiet >lg.log 2>&1 &
LGP=$!
while [ ! -e ready ] && kill -0 $LGP 2>/dev/null; do sleep 0.1; done
sleep 1
C0=$(cpu_ns) D0=$(delivered) T0=$(date +%s.%N)
if [ -n "$PERF" ]; then
  NODES=$(IFS=,; echo "${PIDS[*]:1}")
  perf record -e cpu-clock -F 4000 -g -o perf.data -p "$NODES" -- sleep 10 >perf.log 2>&1 &
fi
while [ ! -e drained ] && kill -0 $LGP 2>/dev/null; do sleep 0.1; done
C1=$(cpu_ns) D1=$(delivered) T1=$(date +%s.%N)
wait $LGP || true
python3 - "$C0" "$C1" "$D0" "$D1" "$T0" "$T1" <<'PY'
import json, sys
c0, c1, d0, d1 = map(int, sys.argv[1:5]); t0, t1 = map(float, sys.argv[5:7])
r = json.load(open("res.json"))
print(json.dumps({k: r.get(k) for k in ("delivered", "lost", "duplicates", "out_of_order",
                                          "unexpected_closes") if k in r} | {"latency_ms": r.get("latency")}))
d = d1 - d0
print(f"window {t1 - t0:.1f} s: {d} deliveries ({d / (t1 - t0):,.0f}/s), server CPU "
      f"{(c1 - c0) / 1e9:.2f} s = {(c1 - c0) / 1e3 / max(d, 1):.2f} us per delivery")
PY
