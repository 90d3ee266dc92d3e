#!/usr/bin/env bash
# ferry through a delayed, jittered, reordering link (the testkit UDP impairment proxy on
# loopback; no root needed), against the same transfer without the proxy, in one batch.
#
#   scripts/bench-delay.sh [--size-mb 64] [--rounds 2] [--tag delay]
#
# Cases per round: direct (no proxy); proxy with no delay; 20 ± 5 ms each way keeping order;
# the same with 1% of datagrams held back one extra delay (reordered); 20 ± 5 ms with every
# datagram delayed independently (a burst is shuffled within ±5 ms, like netem jitter).
# Data: incompressible. Results: bench-results/<tag>-<time>.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
SIZE_MB=64
ROUNDS=2
TAG=delay
while [ $# -gt 0 ]; do
  case "$1" in
    --size-mb) SIZE_MB=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --tag) TAG=$2; shift 2 ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
[ -n "${NO_BUILD:-}" ] || cargo build --release --quiet --bin ferry -p ferry-testkit --example udp_impair
FERRY=$REPO/target/release/ferry
PROXY=$REPO/target/release/examples/udp_impair
WORK=${WORK:-$REPO/target/bench-work}
mkdir -p "$WORK" "$REPO/bench-results"
TMP=$(mktemp -d "$WORK/delay.XXXXXX")
PIDS=()
cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
SRC="$WORK/delay-random-${SIZE_MB}MiB"
if [ ! -f "$SRC.done" ]; then
  mkdir -p "$SRC"
  head -c "$((SIZE_MB * 1048576))" /dev/urandom >"$SRC/video.mp4"
  touch "$SRC.done"
fi
BYTES=$(stat -c %s "$SRC/video.mp4")
RESULTS="$REPO/bench-results/$TAG-$(date -u +%Y%m%dT%H%M%SZ).jsonl"
echo "start: $(date -u +%FT%TZ) uptime:$(uptime); $SIZE_MB MiB incompressible" | tee "$RESULTS.txt" >&2
now() { date +%s.%N; }
PORT=41000
run() { # round case proxy-args...
  local round=$1 case=$2 t0 t1 sp rp pp addr
  shift 2
  PORT=$((PORT + 2))
  rm -rf "$TMP/dest" "$TMP/hs" "$TMP/hr"
  mkdir -p "$TMP/hs" "$TMP/hr"
  t0=$(now)
  FERRY_HOME="$TMP/hs" "$FERRY" send "$SRC" --listen "127.0.0.1:$PORT" --no-mdns --json --code 1234-5678 >"$TMP/s.json" 2>"$TMP/s.err" &
  sp=$!; PIDS+=("$sp")
  until grep -q '"listening"' "$TMP/s.json" 2>/dev/null; do sleep 0.02; done
  addr=127.0.0.1:$PORT
  if [ "$case" != direct ]; then
    "$PROXY" "127.0.0.1:$((PORT + 1))" "127.0.0.1:$PORT" "$@" --seconds 600 >"$TMP/p.out" &
    pp=$!; PIDS+=("$pp")
    until grep -q listening "$TMP/p.out" 2>/dev/null; do sleep 0.02; done
    addr=127.0.0.1:$((PORT + 1))
  fi
  FERRY_HOME="$TMP/hr" "$FERRY" receive "$TMP/dest" --connect "$addr" --code 1234-5678 --json >"$TMP/r.json" 2>"$TMP/r.err" &
  rp=$!; PIDS+=("$rp")
  wait "$rp"; t1=$(now)
  wait "$sp"
  [ "$case" = direct ] || { kill "$pp" 2>/dev/null || true; wait "$pp" 2>/dev/null || true; }
  PIDS=()
  line=$(printf '{"bench":"delay","round":%s,"case":"%s","bytes":%s,"wall_s":%s,"load1":%s}' "$round" "$case" "$BYTES" \
    "$(awk -v a="$t1" -v b="$t0" 'BEGIN { printf "%.3f", a - b }')" "$(cut -d' ' -f1 /proc/loadavg)")
  echo "  $line" >&2
  echo "$line" >>"$RESULTS"
}
for round in $(seq 1 "$ROUNDS"); do
  run "$round" direct
  run "$round" proxy0 --delay-ms 0 --jitter-ms 0
  run "$round" d20j5 --delay-ms 20 --jitter-ms 5
  run "$round" d20j5-reorder1 --delay-ms 20 --jitter-ms 5 --reorder 0.01
  run "$round" d20j5-shuffle --delay-ms 20 --jitter-ms 5 --shuffle
done
python3 - "$RESULTS" <<'PY' | tee -a "$RESULTS.txt"
import json, statistics, sys
from collections import defaultdict
by = defaultdict(list)
for l in open(sys.argv[1]):
    r = json.loads(l); by[r["case"]].append(r)
print("| case | runs | wall s median (min–max) | MB/s | load1 |")
print("|---|---|---|---|---|")
for c, rs in by.items():
    w = [r["wall_s"] for r in rs]; m = statistics.median(w)
    print(f"| {c} | {len(rs)} | {m:.2f} ({min(w):.2f}–{max(w):.2f}) | {rs[0]['bytes'] / m / 1e6:.1f} | {min(r['load1'] for r in rs):.1f}–{max(r['load1'] for r in rs):.1f} |")
PY
