#!/usr/bin/env bash
# The raw floor at the chat rate, outside CI (issue 13): `loadgen ceiling-server` (plain
# sockets, pre-built frames, one write per delivery) broadcasting a 298-byte frame (the
# gateway's measured chat frame) to 1000 members at 20 messages/s for 20 s; prints its CPU
# (every thread, from /proc/*/task/*/schedstat) per delivery, the way delivery-ab.sh measures
# the gateway's, so that the two can be run one after the other (chat-vs-floor.sh).
#
#   scripts/bench/raw-chat.sh LOADGEN_BIN OUT_DIR
set -euo pipefail
LG=$(realpath "$1") OUT=$2
mkdir -p "$OUT"
cd "$OUT"
P=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$LG" ceiling-server --listen "127.0.0.1:$P" --members 1000 --frame-bytes 298 --duration 20 \
  --rate 20 --batch 1 >srv.out 2>srv.log &
SP=$!
trap 'kill $SP 2>/dev/null || true' EXIT
for _ in $(seq 100); do grep -q listening srv.out 2>/dev/null && break; sleep 0.1; done
cpu_ns() { awk '{print $1}' /proc/"$SP"/task/*/schedstat 2>/dev/null | awk '{s += $1} END {print s + 0}'; }
rm -f ready
"$LG" ceiling --url "ws://127.0.0.1:$P/ws" -c 1000 -d 25 --drain 2 --json res.json \
  --ready-file ready --quiet >lg.log 2>&1 &
LGP=$!
while [ ! -e ready ] && kill -0 $LGP 2>/dev/null; do sleep 0.1; done
C0=$(cpu_ns) C1=$C0
# The server exits once its 20 s are over: keep the highest reading taken while it lived (one
# taken while its threads exit misses theirs).
while kill -0 $SP 2>/dev/null; do
  c=$(cpu_ns)
  [ "$c" -gt "$C1" ] && C1=$c
  sleep 0.05
done
wait $LGP || true
python3 - "$C0" "$C1" <<'PY'
import json, sys
c0, c1 = map(int, sys.argv[1:3])
r = json.load(open("res.json"))
d = r["delivered"]
print(json.dumps({k: r.get(k) for k in ("delivered", "lost", "duplicates", "out_of_order")}
                 | {"latency_ms": r.get("latency")}))
print(f"raw floor: {d} deliveries, server CPU {(c1 - c0) / 1e9:.2f} s = "
      f"{(c1 - c0) / 1e3 / max(d, 1):.2f} us per delivery")
PY
