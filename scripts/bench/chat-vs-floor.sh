#!/usr/bin/env bash
# The chat-rate target of issue 13 (server CPU per delivery ≤ 1.2 × the raw one-write floor),
# outside CI: PAIRS pairs (default 5) of the raw floor (raw-chat.sh) and the gateway
# (delivery-ab.sh chat: 3 nodes + Redis, a room of 1000, 20 msg/s), one right after the other,
# then each pair's ratio and the medians. On this shared 2-vCPU machine a single run of either
# moves by up to 2× from minute to minute, so one pair is a sample, not a verdict.
#
#   scripts/bench/chat-vs-floor.sh GATEWAY_BIN LOADGEN_BIN OUT_DIR
set -euo pipefail
GW=$1 LG=$2 OUT=$3
HERE=$(dirname "$(realpath "$0")")
mkdir -p "$OUT"
for i in $(seq "${PAIRS:-5}"); do
  "$HERE/raw-chat.sh" "$LG" "$OUT/raw$i" | tail -1 | tee -a "$OUT/pairs.txt"
  "$HERE/delivery-ab.sh" "$GW" "$LG" "$OUT/gw$i" chat | tail -1 | tee -a "$OUT/pairs.txt"
done
python3 - "$OUT/pairs.txt" <<'PY'
import re, statistics, sys
lines = open(sys.argv[1]).read().splitlines()
us = lambda line: float(re.search(r"= (-?[0-9.]+) us per delivery", line).group(1))
raw = [us(l) for l in lines if l.startswith("raw floor")]
gw = [us(l) for l in lines if l.startswith("window")]
for i, (r, g) in enumerate(zip(raw, gw), 1):
    print(f"pair {i}: raw {r:.2f} us, gateway {g:.2f} us, ratio {g / r:.2f}")
ratios = [g / r for r, g in zip(raw, gw)]
print(f"median: raw {statistics.median(raw):.2f} us, gateway {statistics.median(gw):.2f} us, "
      f"ratio of medians {statistics.median(gw) / statistics.median(raw):.2f}, "
      f"median ratio {statistics.median(ratios):.2f}")
PY
