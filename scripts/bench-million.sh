#!/usr/bin/env bash
# A million tiny files: a chat history of 512 MiB (its message databases ≈ 64 MiB, checkpointed) plus N files of
# 0–4 KiB (default 1 000 000, in folders of 1 000, like a sticker or thumbnail cache), moved over
# loopback by each given ferry build with `ulimit -n 256` on both ends (macOS's default).
# Reports per run: wall seconds, files/s, CPU seconds and peak RSS of each end, and whether the
# trees are identical (every file's path and SHA-1) and `ferry verify` passes.
#
#   scripts/bench-million.sh [--files N] [--rounds 1] [--keep] BINARY...
#
# Builds alternate within a round (order reversed every other round). Results: one JSON line per
# run in bench-results/million-<N>-<time>.jsonl; each run's events in target/bench-logs/.
# The generated source (≈ 4.5 GB on disk for a million files) is deleted afterwards unless --keep.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
FILES=1000000
ROUNDS=1
KEEP=
BINS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --files) FILES=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --keep) KEEP=1; shift ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    -*) echo "unknown option $1" >&2; exit 2 ;;
    *) BINS+=("$(realpath "$1")"); shift ;;
  esac
done
[ ${#BINS[@]} -gt 0 ] || { echo "give at least one ferry binary" >&2; exit 2; }

WORK=${WORK:-$REPO/target/bench-work}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RESULTS="$REPO/bench-results/million-$FILES-$STAMP.jsonl"
LOGS="$REPO/target/bench-logs/million-$FILES-$STAMP"
mkdir -p "$WORK" "$LOGS" "$REPO/bench-results"
SRC="$WORK/src-million-$FILES"

cargo build --release --quiet --example gen_history
if [ ! -f "$SRC.done" ]; then
  rm -rf "$SRC"
  echo "bench-million: generating $SRC" >&2
  "$REPO/target/release/examples/gen_history" "$SRC" --size 512MiB --checkpoint >&2
  python3 - "$SRC/Stickers" "$FILES" <<'EOF'
import os, random, sys
root, n = sys.argv[1], int(sys.argv[2])
rng = random.Random(7)
blob = rng.randbytes(1 << 20)
for i in range(n):
    d = os.path.join(root, f"{i // 1000:04d}")
    if i % 1000 == 0:
        os.makedirs(d, exist_ok=True)
    size = rng.randrange(0, 4097)
    off = rng.randrange(0, len(blob) - 4096)
    with open(os.path.join(d, f"{i:07d}.webp"), "wb") as f:
        # An 8-byte header makes every file distinct (no chunk dedup across files).
        f.write(i.to_bytes(8, "little")[: min(8, size)] + blob[off : off + max(0, size - 8)])
EOF
  touch "$SRC.done"
fi
NFILES=$(find "$SRC" -type f | wc -l)
echo "bench-million: source $SRC: $NFILES files" >&2

# Every file's path and SHA-1 (ferry's own .ferry folder left out); a database (a snapshot taken
# through SQLite, so not byte-identical) by the SHA-1 of its SQL dump.
digest() {
  (
    cd "$1"
    find . -path ./.ferry -prune -o -type f ! -name '*.db' -print0 | sort -z | xargs -0 sha1sum
    find . -path ./.ferry -prune -o -type f -name '*.db' -print | sort | while read -r db; do
      echo "$(sqlite3 "file:$db?immutable=1" .dump | sha1sum | cut -c1-40)  $db (dump)"
    done
  )
}
digest "$SRC" >"$LOGS/src.sha1"

PORT=41000
run() { # round binary
  local round=$1 bin=$2 tag dest t0 t1 sp rp ok verify
  tag=$(basename "$(dirname "$bin")")-$(basename "$bin")
  PORT=$((PORT + 1))
  dest="$WORK/million-dest"
  rm -rf "$dest" "$WORK/million-home-s" "$WORK/million-home-r"
  mkdir -p "$WORK/million-home-s" "$WORK/million-home-r"
  sync
  t0=$(date +%s.%N)
  (ulimit -n 256; FERRY_HOME="$WORK/million-home-s" exec /usr/bin/time -f '%M %U %S' -o "$LOGS/$round-$tag-send.time" \
    "$bin" send "$SRC" --listen "127.0.0.1:$PORT" --no-mdns --json --code 1234-5678 \
    >"$LOGS/$round-$tag-send.json" 2>"$LOGS/$round-$tag-send.err") &
  sp=$!
  until grep -q '"listening"' "$LOGS/$round-$tag-send.json" 2>/dev/null; do
    kill -0 "$sp" 2>/dev/null || { cat "$LOGS/$round-$tag-send.err" >&2; return 1; }
    sleep 0.05
  done
  (ulimit -n 256; FERRY_HOME="$WORK/million-home-r" exec /usr/bin/time -f '%M %U %S' -o "$LOGS/$round-$tag-receive.time" \
    "$bin" receive "$dest" --connect "127.0.0.1:$PORT" --code 1234-5678 --json \
    >"$LOGS/$round-$tag-receive.json" 2>"$LOGS/$round-$tag-receive.err") &
  rp=$!
  ok=true
  wait "$sp" || ok=false
  wait "$rp" || ok=false
  t1=$(date +%s.%N)
  verify=$(FERRY_HOME="$WORK/million-home-r" "$bin" verify "$dest" >/dev/null 2>&1 && echo true || echo false)
  local same=false
  if $ok; then
    digest "$dest" >"$LOGS/$round-$tag-dest.sha1"
    if cmp -s "$LOGS/src.sha1" "$LOGS/$round-$tag-dest.sha1"; then
      same=true
    else
      echo "bench-million: trees differ:" >&2
      diff "$LOGS/src.sha1" "$LOGS/$round-$tag-dest.sha1" | head -5 >&2
    fi
  fi
  python3 - "$round" "$bin" "$t0" "$t1" "$NFILES" "$ok" "$same" "$verify" \
    "$LOGS/$round-$tag-send.time" "$LOGS/$round-$tag-receive.time" "$(cut -d' ' -f1 /proc/loadavg)" <<'EOF' | tee -a "$RESULTS"
import json, sys
r, b, t0, t1, n, ok, same, ver, st, rt, load = sys.argv[1:]
def times(p):
    try:
        kib, u, s = open(p).read().split()[-3:]
        return int(kib) // 1024, round(float(u) + float(s), 1)
    except Exception:
        return None, None
srss, scpu = times(st)
rrss, rcpu = times(rt)
secs = float(t1) - float(t0)
print(json.dumps({"round": int(r), "binary": b, "files": int(n), "secs": round(secs, 1),
                  "files_per_s": round(int(n) / secs), "exit_ok": ok == "true",
                  "trees_identical": same == "true", "verify_ok": ver == "true",
                  "send_rss_mib": srss, "recv_rss_mib": rrss, "send_cpu_s": scpu,
                  "recv_cpu_s": rcpu, "nofile": 256, "load1": float(load)}))
EOF
  rm -rf "$dest"
}

for ((round = 1; round <= ROUNDS; round++)); do
  order=("${BINS[@]}")
  if ((round % 2 == 0)); then
    order=()
    for ((i = ${#BINS[@]} - 1; i >= 0; i--)); do order+=("${BINS[$i]}"); done
  fi
  for b in "${order[@]}"; do
    run "$round" "$b" || echo "bench-million: run failed: $b (logs in $LOGS)" >&2
  done
done
echo "results: $RESULTS" >&2
[ -n "$KEEP" ] || rm -rf "$SRC" "$SRC.done"
