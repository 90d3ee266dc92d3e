# Shared pieces of the namespace-link benchmarks (bench-link.sh, bench-resume.sh). Sourced, not
# run. Root only. Two network namespaces joined by one veth pair (10.78.0.1 = A, the sender;
# 10.78.0.2 = B, the receiver); nothing is created in or routed through the host's namespace.
# Every namespace, process and scratch folder is removed on exit, also on failure or Ctrl-C.

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
FERRY=${FERRY:-$REPO/target/release/ferry}
WORK=${WORK:-$REPO/target/bench-work}
A_IP=10.78.0.1
B_IP=10.78.0.2

lan_require_root() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "$(basename "$0"): skipped: needs root (network namespaces, tc, iptables)" >&2
    exit 0
  fi
}

lan_install_tools() {
  local need=()
  command -v ip >/dev/null 2>&1 || need+=(iproute2)
  command -v tc >/dev/null 2>&1 || need+=(iproute2)
  command -v iptables >/dev/null 2>&1 || need+=(iptables)
  command -v nc >/dev/null 2>&1 || need+=(netcat-openbsd)
  [ -x /usr/bin/time ] || need+=(time)
  command -v python3 >/dev/null 2>&1 || need+=(python3)
  if [ ${#need[@]} -gt 0 ]; then
    echo "$(basename "$0"): installing ${need[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi
  if [ -z "${NO_BUILD:-}" ]; then
    echo "$(basename "$0"): building ferry (release)" >&2
    (cd "$REPO" && cargo build --release --quiet --bin ferry --example gen_history)
  fi
}

# Unique names: several runs (or a crashed one) never collide.
NS_A=fla$$
NS_B=flb$$
LAN_PIDS=()
LAN_TMP=

# SIGKILL a process started as `ip netns exec NS /usr/bin/time PROG` (the pid is time's, after
# ip's exec): its child first (the measured program), then time itself.
kill_tree() {
  local c
  for c in $(pgrep -P "$1" 2>/dev/null); do kill -9 "$c" 2>/dev/null || true; done
  kill -9 "$1" 2>/dev/null || true
}

# SIGKILL only the measured program; /usr/bin/time then exits and reports.
kill_child() {
  local c
  for c in $(pgrep -P "$1" 2>/dev/null); do kill -9 "$c" 2>/dev/null || true; done
}

lan_cleanup() {
  local p
  for p in "${LAN_PIDS[@]}"; do kill_tree "$p"; done
  for p in "${LAN_PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  ip netns del "$NS_A" 2>/dev/null || true
  ip netns del "$NS_B" 2>/dev/null || true
  [ -z "$LAN_TMP" ] || rm -rf "$LAN_TMP"
}

lan_setup() {
  mkdir -p "$WORK" "$REPO/bench-results"
  LAN_TMP=$(mktemp -d "$WORK/lan.XXXXXX")
  trap lan_cleanup EXIT
  trap 'exit 130' INT TERM
  ip netns add "$NS_A"
  ip netns add "$NS_B"
  ip link add "v$NS_A" type veth peer name "v$NS_B"
  ip link set "v$NS_A" netns "$NS_A"
  ip link set "v$NS_B" netns "$NS_B"
  ip -n "$NS_A" addr add "$A_IP/24" dev "v$NS_A"
  ip -n "$NS_B" addr add "$B_IP/24" dev "v$NS_B"
  local ns
  for ns in "$NS_A" "$NS_B"; do
    ip -n "$ns" link set lo up
    # A counting rule: bytes that reached this host (all protocols), for "bytes on the wire".
    ip netns exec "$ns" iptables -N FERRY_COUNT
    ip netns exec "$ns" iptables -A INPUT -j FERRY_COUNT
    ip netns exec "$ns" iptables -N FERRY_LOSS
    ip netns exec "$ns" iptables -A INPUT -j FERRY_LOSS
    ip netns exec "$ns" iptables -N FERRY_BLACKOUT
    ip netns exec "$ns" iptables -I INPUT 1 -j FERRY_BLACKOUT
    ip netns exec "$ns" iptables -I OUTPUT 1 -j FERRY_BLACKOUT
  done
  ip -n "$NS_A" link set "v$NS_A" up
  ip -n "$NS_B" link set "v$NS_B" up
}

# Bits per second of a tc rate.
rate_bits() {
  echo "$1" | awk '{ v = $0 + 0; if ($0 ~ /gbit/) v *= 1e9; else if ($0 ~ /mbit/) v *= 1e6; else if ($0 ~ /kbit/) v *= 1e3; printf "%.0f", v }'
}

# lan_link RATE LOSS: token bucket on both ends' egress (10 ms of traffic, ≥ 64 KiB, drop
# after 20 ms queued); random loss of every incoming packet (TCP and UDP alike) on both ends.
lan_link() {
  local rate=$1 loss=$2 bits burst ns
  bits=$(rate_bits "$rate")
  burst=$(awk -v b="$bits" 'BEGIN { x = b / 8 / 100; if (x < 65536) x = 65536; printf "%.0f", x }')
  tc -n "$NS_A" qdisc replace dev "v$NS_A" root tbf rate "$rate" burst "$burst" latency 20ms
  tc -n "$NS_B" qdisc replace dev "v$NS_B" root tbf rate "$rate" burst "$burst" latency 20ms
  for ns in "$NS_A" "$NS_B"; do
    ip netns exec "$ns" iptables -F FERRY_LOSS
    if [ "$loss" != "0" ]; then
      ip netns exec "$ns" iptables -A FERRY_LOSS -m statistic --mode random --probability "$loss" -j DROP
    fi
  done
}

lan_blackout_on() { ip netns exec "$NS_B" iptables -A FERRY_BLACKOUT -j DROP; }
lan_blackout_off() { ip netns exec "$NS_B" iptables -F FERRY_BLACKOUT; }

# Bytes counted into B (the receiver) since the last reset.
lan_count_reset() { ip netns exec "$NS_B" iptables -Z FERRY_COUNT; }
lan_count_bytes() {
  ip netns exec "$NS_B" iptables -nvx -L FERRY_COUNT | awk 'NR > 2 { s += $2 } END { printf "%.0f", s }'
}
# FERRY_COUNT has no rule yet: add one that matches everything (once).
lan_count_init() {
  ip netns exec "$NS_B" iptables -A FERRY_COUNT
}

now() { date +%s.%N; }
sub() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", a - b }'; }
load1() { cut -d' ' -f1 /proc/loadavg; }
TFMT='%e %U %S %M'

# Deterministic incompressible data: SIZE_MB MiB in 4 files (ChaCha-like keystream via openssl
# would add a dependency; /dev/urandom once, cached).
make_random_src() { # dir size_mb
  local d=$1 mb=$2 i
  [ -f "$d.done" ] && return 0
  rm -rf "$d"
  mkdir -p "$d/media"
  for i in 1 2 3 4; do
    head -c "$((mb * 1024 * 1024 / 4))" /dev/urandom >"$d/media/video$i.mp4"
  done
  touch "$d.done"
}

# Text-heavy data (chat-export-like lines of words; zstd -1 shrinks it ≈3×), SIZE_MB MiB in 4
# files, seeded.
make_text_src() { # dir size_mb
  local d=$1 mb=$2
  [ -f "$d.done" ] && return 0
  rm -rf "$d"
  mkdir -p "$d/exports"
  python3 - "$d/exports" "$mb" <<'EOF'
import random, sys, os
out, mb = sys.argv[1], int(sys.argv[2])
rng = random.Random(7)
words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
         for _ in range(20000)]
import itertools
cum = list(itertools.accumulate(1.0 / (i + 1) for i in range(len(words))))
names = ["alice", "bob", "carol", "dave", "mum", "dad", "team", "li wei", "zhang min"]
per = mb * 1024 * 1024 // 4
# A pool of ~16 MiB of lines, then each file draws lines from it (fast; a 128 KiB chunk holds
# ~1000 lines from 16 MiB, so it compresses like fresh text).
pool, size, t = [], 0, 1_600_000_000
while size < 16 * 1024 * 1024:
    t += rng.randint(1, 600)
    line = "%d\t%s\t%s\n" % (t, rng.choice(names),
                              " ".join(rng.choices(words, cum_weights=cum, k=rng.randint(3, 30))))
    pool.append(line)
    size += len(line)
for f in range(4):
    with open(os.path.join(out, f"chat{f}.txt"), "w") as fh:
        n = 0
        while n < per:
            block = "".join(rng.choices(pool, k=1000))
            fh.write(block)
            n += len(block)
EOF
  touch "$d.done"
}

# Runs one ferry migration A → B. Sets: LAN_WALL (sender start → receiver exit), LAN_WIRE (the
# sender's chunk payload bytes), LAN_RSS_S / LAN_RSS_R (KiB), LAN_CPU_S / LAN_CPU_R.
# Extra behaviour per kind: none | blackout:SECS@FRACTION | killrecv@FRACTION | killsend@FRACTION
ferry_run() { # src kind
  local src=$1 kind=${2:-none} t0 t1 sp rp port=7000 dest="$LAN_TMP/dest"
  rm -rf "$dest" "$LAN_TMP/hs" "$LAN_TMP/hr"
  mkdir -p "$LAN_TMP/hs" "$LAN_TMP/hr"
  sync
  t0=$(now)
  ferry_start_sender "$src" "$port"
  ferry_start_receiver "$dest" "$port" --code 1234-5678
  case "$kind" in
    none) ;;
    blackout:*)
      local secs=${kind#blackout:} at
      at=${secs#*@}; secs=${secs%@*}
      wait_fraction "$LAN_TMP/r.json" "$at"
      LAN_EVENT_T=$(now)
      lan_blackout_on
      sleep "$secs"
      lan_blackout_off
      ;;
    killrecv@*)
      wait_fraction "$LAN_TMP/r.json" "${kind#killrecv@}"
      kill_child "$LAN_RP"; wait "$LAN_RP" 2>/dev/null || true
      LAN_EVENT_T=$(now)
      mv "$LAN_TMP/r.json" "$LAN_TMP/r1.json"
      ferry_start_receiver "$dest" "$port"
      ;;
    killsend@*)
      wait_fraction "$LAN_TMP/r.json" "${kind#killsend@}"
      kill_child "$LAN_SP"; wait "$LAN_SP" 2>/dev/null || true
      LAN_EVENT_T=$(now)
      mv "$LAN_TMP/s.json" "$LAN_TMP/s1.json"
      ferry_start_sender "$src" "$port"
      ;;
  esac
  wait "$LAN_RP" || { echo "receiver failed:" >&2; tail -5 "$LAN_TMP/r.err" >&2; return 1; }
  t1=$(now)
  wait "$LAN_SP" || { echo "sender failed:" >&2; tail -5 "$LAN_TMP/s.err" >&2; return 1; }
  LAN_PIDS=()
  LAN_WALL=$(sub "$t1" "$t0")
  LAN_WIRE=$(grep '"done"' "$LAN_TMP/s.json" | python3 -c 'import json,sys; print(json.loads(sys.stdin.readline())["wire_bytes"])')
  read -r _ us ss LAN_RSS_S <"$LAN_TMP/s.time"
  read -r _ ur sr LAN_RSS_R <"$LAN_TMP/r.time"
  LAN_CPU_S=$(awk -v a="$us" -v b="$ss" 'BEGIN { printf "%.2f", a + b }')
  LAN_CPU_R=$(awk -v a="$ur" -v b="$sr" 'BEGIN { printf "%.2f", a + b }')
  rm -rf "$dest"
}

ferry_start_sender() { # src port
  rm -f "$LAN_TMP/s.json"
  FERRY_HOME="$LAN_TMP/hs" ip netns exec "$NS_A" /usr/bin/time -f "$TFMT" -o "$LAN_TMP/s.time" \
    "$FERRY" send "$1" --listen "$A_IP:$2" --no-mdns --json --code 1234-5678 \
    >"$LAN_TMP/s.json" 2>"$LAN_TMP/s.err" &
  LAN_SP=$!
  LAN_PIDS+=("$LAN_SP")
  until grep -q '"listening"' "$LAN_TMP/s.json" 2>/dev/null; do
    kill -0 "$LAN_SP" 2>/dev/null || { cat "$LAN_TMP/s.err" >&2; return 1; }
    sleep 0.02
  done
}

# A restarted receiver is already paired (it pinned the sender's key); passing the used code
# again fails with "no active pairing code", so restarts go without --code.
ferry_start_receiver() { # dest port [--code CODE]
  FERRY_HOME="$LAN_TMP/hr" ip netns exec "$NS_B" /usr/bin/time -f "$TFMT" -o "$LAN_TMP/r.time" \
    "$FERRY" receive "$1" --connect "$A_IP:$2" "${@:3}" --json \
    >"$LAN_TMP/r.json" 2>"$LAN_TMP/r.err" &
  LAN_RP=$!
  LAN_PIDS+=("$LAN_RP")
}

# Waits until the receiver's progress reaches FRACTION of the bytes.
wait_fraction() { # json fraction
  python3 - "$1" "$2" <<'EOF'
import json, sys, time
path, frac = sys.argv[1], float(sys.argv[2])
deadline = time.time() + 600
while time.time() < deadline:
    try:
        for line in open(path):
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if e.get("event") == "progress" and e["bytes_done"] >= frac * e["bytes_total"]:
                sys.exit(0)
            if e.get("event") == "done":
                sys.exit(0)
    except FileNotFoundError:
        pass
    time.sleep(0.05)
sys.exit("no progress to %s" % frac)
EOF
}

# tar | nc from A to B. Sets LAN_WALL, LAN_CPU_S, LAN_CPU_R, LAN_RSS_S, LAN_RSS_R.
tar_run() { # src
  local src=$1 t0 t1 rp port=7100 dest="$LAN_TMP/dest"
  rm -rf "$dest"
  mkdir -p "$dest"
  sync
  ip netns exec "$NS_B" /usr/bin/time -f "$TFMT" -o "$LAN_TMP/r.time" bash -c \
    "nc -d -l $B_IP $port | tar -C '$dest' -xf -" &
  rp=$!
  LAN_PIDS+=("$rp")
  for _ in $(seq 100); do
    ip netns exec "$NS_B" ss -Hltn "sport = :$port" | grep -q . && break
    sleep 0.05
  done
  t0=$(now)
  ip netns exec "$NS_A" /usr/bin/time -f "$TFMT" -o "$LAN_TMP/s.time" bash -c \
    "tar -C '$src' -cf - . | nc -q0 $B_IP $port"
  wait "$rp"
  t1=$(now)
  LAN_PIDS=()
  LAN_WALL=$(sub "$t1" "$t0")
  read -r _ us ss LAN_RSS_S <"$LAN_TMP/s.time"
  read -r _ ur sr LAN_RSS_R <"$LAN_TMP/r.time"
  LAN_CPU_S=$(awk -v a="$us" -v b="$ss" 'BEGIN { printf "%.2f", a + b }')
  LAN_CPU_R=$(awk -v a="$ur" -v b="$sr" 'BEGIN { printf "%.2f", a + b }')
  rm -rf "$dest"
}

tree_bytes() { find "$1" -type f -printf '%s\n' | awk '{ s += $1 } END { printf "%.0f", s }'; }
tree_files() { find "$1" -type f | wc -l; }

machine_line() {
  echo "machine: $(nproc) cpus, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), kernel $(uname -r), $(free -g | awk '/Mem:/ {print $2}') GiB RAM"
}
