#!/usr/bin/env bash
# Loopback benchmark of ferry against tar|nc, tar|zstd|nc, rsync over ssh and scp, plus scan+hash
# throughput against b3sum and the in-memory protocol throughput. See BENCHMARKS.md.
#
#   scripts/bench-loopback.sh [--size 2GiB] [--small-files N] [--rounds 3] [--workdir DIR]
#                             [--only LIST] [--tag NAME] [--baseline-bin DIR] [--warmup 1]
#                             [--dest-fs fresh|same]
#
# --dest-fs fresh (default): every run writes into a new ext4 file system on a loop device;
# --dest-fs same: into a folder on the source's file system.
# --warmup 0 skips the unmeasured warm-up round (for sources larger than the page cache, where
# it would only double the time).
# --baseline-bin DIR: DIR holds an older build's `ferry` and `proto_bench`; every round then also
# runs them next to the current build's (swapping which goes first each round) as tools ferry@base
# and proto@base, for before/after.
# --only takes a comma list of: tar,tarzstd,rsync,rsyncgcm,scp,ferry,scan,b3sum,proto,protoraw
# (default: all). Runs as root (it installs Debian packages when missing and starts a throwaway
# sshd on 127.0.0.1:2222 with its own keys in a temporary folder). Only 127.0.0.1 is used.
# Everything it starts is stopped on exit, also on failure or Ctrl-C.
#
# Every round runs every tool once, on the same data, into a fresh destination (even rounds in
# reverse order), after an unmeasured warm-up round (page cache warm). Each result is one JSON
# line in bench-results/<tag>-<time>.jsonl; a summary table (medians, min–max, ratios) follows.
# ferry's own output of every run (both ends' --json events, stderr and /usr/bin/time figures)
# is kept in target/bench-logs/<tag>-<time>/<round>-<tool>-{send,receive}.{json,err,time}, so an
# outlier can be looked at afterwards. NO_BUILD=1 uses target/release as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

SIZE=2GiB
SMALL=0
ROUNDS=3
WORK="$REPO/target/bench-work"
ONLY="tar,tarzstd,rsync,rsyncgcm,scp,ferry,scan,b3sum,proto,protoraw"
TAG=loopback
BASE=
WARMUP=1
DEST_FS=fresh
while [ $# -gt 0 ]; do
  case "$1" in
    --size) SIZE=$2; shift 2 ;;
    --small-files) SMALL=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --workdir) WORK=$2; shift 2 ;;
    --only) ONLY=$2; shift 2 ;;
    --tag) TAG=$2; shift 2 ;;
    --baseline-bin) BASE=$(cd "$2" && pwd); shift 2 ;;
    --warmup) WARMUP=$2; shift 2 ;;
    --dest-fs) DEST_FS=$2; shift 2 ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
want() { [[ ",$ONLY," == *",$1,"* ]]; }

if [ "$(id -u)" -ne 0 ]; then
  echo "bench-loopback: run as root (installs packages, runs a throwaway sshd)" >&2
  exit 1
fi

# ---- tools ---------------------------------------------------------------------------------
need=()
command -v nc >/dev/null 2>&1 || need+=(netcat-openbsd)
command -v rsync >/dev/null 2>&1 || need+=(rsync)
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v ssh >/dev/null 2>&1 || need+=(openssh-client)
command -v zstd >/dev/null 2>&1 || need+=(zstd)
[ -x /usr/bin/time ] || need+=(time)
command -v python3 >/dev/null 2>&1 || need+=(python3)
if [ ${#need[@]} -gt 0 ]; then
  echo "bench-loopback: installing ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
TOOLS="$REPO/target/bench-tools"
if command -v b3sum >/dev/null 2>&1; then
  B3SUM=$(command -v b3sum)
else
  B3SUM="$TOOLS/bin/b3sum"
  if [ ! -x "$B3SUM" ]; then
    echo "bench-loopback: cargo install b3sum into $TOOLS" >&2
    cargo install b3sum --locked --root "$TOOLS" >/dev/null
  fi
fi

# NO_BUILD=1: use target/release as it is (an interleaved comparison must not rebuild midway).
if [ -z "${NO_BUILD:-}" ]; then
  echo "bench-loopback: building ferry (release)" >&2
  cargo build --release --quiet --bin ferry --example gen_history --example scan_bench --example proto_bench
fi
BIN="$REPO/target/release"
FERRY="$BIN/ferry"

# ---- scratch space, background processes, cleanup ------------------------------------------
mkdir -p "$WORK" "$REPO/bench-results"
TMP=$(mktemp -d "$WORK/run.XXXXXX")
PIDS=()
SSHD_PID=
cleanup() {
  local p
  for p in "${PIDS[@]}" $SSHD_PID; do
    kill "$p" 2>/dev/null || true
  done
  for p in "${PIDS[@]}" $SSHD_PID; do
    wait "$p" 2>/dev/null || true
  done
  if mountpoint -q "$TMP/fs" 2>/dev/null; then
    umount "$TMP/fs" || true
  fi
  rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- data ----------------------------------------------------------------------------------
SRC="$WORK/src-$SIZE-small$SMALL"
if [ ! -f "$SRC.done" ]; then
  rm -rf "$SRC"
  echo "bench-loopback: generating $SRC" >&2
  "$BIN/examples/gen_history" "$SRC" --size "$SIZE" --small-files "$SMALL" >&2
  touch "$SRC.done"
fi
BYTES=$(find "$SRC" -type f -printf '%s\n' | awk '{s+=$1} END {printf "%.0f", s}')
FILES=$(find "$SRC" -type f | wc -l)
echo "bench-loopback: source $SRC: $FILES files, $BYTES bytes" >&2

# ---- throwaway sshd on 127.0.0.1:2222 --------------------------------------------------------
SSH_OPTS=()
if want rsync || want rsyncgcm || want scp; then
  K="$TMP/ssh"
  mkdir -p "$K" /run/sshd
  chmod 700 "$K"
  ssh-keygen -q -t ed25519 -N '' -f "$K/host_key"
  ssh-keygen -q -t ed25519 -N '' -f "$K/client_key"
  cp "$K/client_key.pub" "$K/authorized_keys"
  cat >"$K/sshd_config" <<EOF
Port 2222
ListenAddress 127.0.0.1
HostKey $K/host_key
AuthorizedKeysFile $K/authorized_keys
PidFile $K/sshd.pid
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
Subsystem sftp internal-sftp
EOF
  /usr/sbin/sshd -D -e -f "$K/sshd_config" 2>"$K/sshd.log" &
  SSHD_PID=$!
  SSH_OPTS=(ssh -p 2222 -i "$K/client_key" -o UserKnownHostsFile=/dev/null
    -o StrictHostKeyChecking=no -o BatchMode=yes -o LogLevel=ERROR)
  SCP_OPTS=(-P 2222 -i "$K/client_key" -o UserKnownHostsFile=/dev/null
    -o StrictHostKeyChecking=no -o BatchMode=yes -o LogLevel=ERROR)
  for _ in $(seq 50); do
    "${SSH_OPTS[@]}" root@127.0.0.1 true 2>/dev/null && break
    sleep 0.1
  done
  "${SSH_OPTS[@]}" root@127.0.0.1 true
fi

# CPU seconds (user+sys) of the reaped children of a process, from /proc/PID/stat.
child_cpu() {
  awk '{sub(/.*\) /, ""); print ($14 + $15) / 100}' "/proc/$1/stat"
}

# ---- one measurement -----------------------------------------------------------------------
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RESULTS="$REPO/bench-results/$TAG-$STAMP.jsonl"
LOGS="$REPO/target/bench-logs/$TAG-$STAMP"
PORT=40000
now() { date +%s.%N; }
sub() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", a - b }'; }
# Drop an exited process from the cleanup list (exact match).
forget() {
  local keep=() p
  for p in "${PIDS[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done
  PIDS=("${keep[@]}")
}
load1() { cut -d' ' -f1 /proc/loadavg; }
# /usr/bin/time output: elapsed user sys maxrss_kb
TFMT='%e %U %S %M'
cpu_of() { awk '{printf "%.2f", $2 + $3}' "$1"; }
rss_of() { awk '{print $4}' "$1"; }

record() { # round tool wall cpu_send cpu_recv rss_send rss_recv wire sync_s
  local line
  line=$(printf '{"round":%s,"tool":"%s","bytes":%s,"files":%s,"wall_s":%.3f,"cpu_send_s":%s,"cpu_recv_s":%s,"rss_send_kb":%s,"rss_recv_kb":%s,"wire_bytes":%s,"sync_s":%.3f,"load1":%s}' \
    "$1" "$2" "$BYTES" "$FILES" "$3" "$4" "$5" "$6" "$7" "$8" "$9" "$(load1)")
  if [ "$1" -gt 0 ]; then echo "$line" >>"$RESULTS"; fi
  echo "  $line" >&2
}

# Every run writes into a freshly made ext4 file system (an image on the same disk, mounted
# through a loop device): on a long-lived file system each run's deletes age it (ext4 skips
# recently deleted inodes when it allocates new ones, a cost that grew to 19 CPU-s for 50 000
# files after a few rounds), which made the small-file figures depend on what ran before.
# --dest-fs same keeps the old behaviour (a plain folder next to the source).
DEST_IMG="$TMP/dest.img"
DEST="$TMP/fs/dest"
fresh_dest() {
  if mountpoint -q "$TMP/fs" 2>/dev/null; then
    umount "$TMP/fs"
  fi
  rm -rf "$TMP/fs" "$DEST_IMG"
  mkdir -p "$TMP/fs"
  if [ "$DEST_FS" = fresh ]; then
    local mib
    mib=$(( $(du -sm "$SRC" | cut -f1) * 13 / 10 + 1024 ))
    truncate -s "${mib}M" "$DEST_IMG"
    mkfs.ext4 -q -F -i 8192 -E lazy_itable_init=0,lazy_journal_init=0 "$DEST_IMG"
    # Direct I/O on the loop device: the image's blocks are not cached twice. Detaching the
    # mounted device only marks it to go away at unmount.
    local dev
    dev=$(losetup -f --show --direct-io=on "$DEST_IMG")
    mount "$dev" "$TMP/fs"
    losetup -d "$dev"
  fi
  mkdir -p "$DEST"
  sync
}

# After a copy, how long it takes to make it durable (ferry fsyncs itself; tar and rsync do not).
sync_secs() {
  local t0
  t0=$(now)
  sync
  sub "$(now)" "$t0"
}

wait_port_tcp() {
  for _ in $(seq 100); do
    ss -Hltn "sport = :$1" | grep -q . && return 0
    sleep 0.05
  done
  echo "nothing listens on $1" >&2
  return 1
}

run_tar() { # round zstd?
  local round=$1 z=$2 tool=tar t0 t1 rp
  PORT=$((PORT + 1))
  fresh_dest
  mkdir -p "$DEST"
  if [ "$z" = 1 ]; then
    tool=tarzstd
    /usr/bin/time -f "$TFMT" -o "$TMP/r.time" bash -c \
      "nc -d -l 127.0.0.1 $PORT | zstd -d -q | tar -C '$DEST' -xf -" &
  else
    /usr/bin/time -f "$TFMT" -o "$TMP/r.time" bash -c \
      "nc -d -l 127.0.0.1 $PORT | tar -C '$DEST' -xf -" &
  fi
  rp=$!
  PIDS+=("$rp")
  wait_port_tcp "$PORT"
  t0=$(now)
  if [ "$z" = 1 ]; then
    /usr/bin/time -f "$TFMT" -o "$TMP/s.time" bash -c \
      "tar -C '$SRC' -cf - . | zstd -1 -q -T1 | nc -q0 127.0.0.1 $PORT"
  else
    /usr/bin/time -f "$TFMT" -o "$TMP/s.time" bash -c \
      "tar -C '$SRC' -cf - . | nc -q0 127.0.0.1 $PORT"
  fi
  wait "$rp"
  t1=$(now)
  forget "$rp"
  record "$round" "$tool" "$(sub "$t1" "$t0")" "$(cpu_of "$TMP/s.time")" \
    "$(cpu_of "$TMP/r.time")" "$(rss_of "$TMP/s.time")" "$(rss_of "$TMP/r.time")" null "$(sync_secs)"
}

run_rsync() { # round cipher
  local round=$1 cipher=$2 tool=rsync t0 t1 c0 c1 ssh_cmd
  fresh_dest
  ssh_cmd="${SSH_OPTS[*]}"
  if [ -n "$cipher" ]; then
    tool=rsyncgcm
    ssh_cmd="$ssh_cmd -c $cipher"
  fi
  c0=$(child_cpu "$SSHD_PID")
  t0=$(now)
  /usr/bin/time -f "$TFMT" -o "$TMP/s.time" \
    rsync -a -e "$ssh_cmd" --rsync-path="/usr/bin/time -f '$TFMT' -o $TMP/r.time rsync" \
    "$SRC/" "root@127.0.0.1:$DEST/"
  t1=$(now)
  # sshd reaps its session processes a moment later.
  sleep 0.5
  c1=$(child_cpu "$SSHD_PID")
  # Receiver CPU: everything under sshd for this session (sshd-session crypto + rsync).
  record "$round" "$tool" "$(sub "$t1" "$t0")" "$(cpu_of "$TMP/s.time")" \
    "$(sub "$c1" "$c0")" "$(rss_of "$TMP/s.time")" \
    "$(rss_of "$TMP/r.time")" null "$(sync_secs)"
}

run_scp() { # round
  local round=$1 t0 t1 c0 c1
  fresh_dest
  c0=$(child_cpu "$SSHD_PID")
  t0=$(now)
  # OpenSSH's scp speaks SFTP; the receiving side is sshd's internal-sftp.
  /usr/bin/time -f "$TFMT" -o "$TMP/s.time" \
    scp -r -q "${SCP_OPTS[@]}" "$SRC" "root@127.0.0.1:$DEST/"
  t1=$(now)
  sleep 0.5
  c1=$(child_cpu "$SSHD_PID")
  # Receiver CPU: everything under sshd for this session; its RSS is not measured (0).
  record "$round" scp "$(sub "$t1" "$t0")" "$(cpu_of "$TMP/s.time")" \
    "$(sub "$c1" "$c0")" "$(rss_of "$TMP/s.time")" 0 null "$(sync_secs)"
}

run_ferry() { # round [binary tool-name]
  local round=$1 bin=${2:-$FERRY} tool=${3:-ferry} t0 t1 rp sp wire
  PORT=$((PORT + 1))
  fresh_dest
  rm -rf "$TMP/home-s" "$TMP/home-r"
  mkdir -p "$TMP/home-s" "$TMP/home-r"
  t0=$(now)
  FERRY_HOME="$TMP/home-s" /usr/bin/time -f "$TFMT" -o "$TMP/s.time" \
    "$bin" send "$SRC" --listen "127.0.0.1:$PORT" --no-mdns --json --code 1234-5678 \
    >"$TMP/s.json" 2>"$TMP/s.err" &
  sp=$!
  PIDS+=("$sp")
  # The sender listens once its scan is done.
  until grep -q '"listening"' "$TMP/s.json" 2>/dev/null; do
    if ! kill -0 "$sp" 2>/dev/null; then
      cat "$TMP/s.err" >&2
      return 1
    fi
    sleep 0.02
  done
  FERRY_HOME="$TMP/home-r" /usr/bin/time -f "$TFMT" -o "$TMP/r.time" \
    "$bin" receive "$DEST" --connect "127.0.0.1:$PORT" --code 1234-5678 --json \
    >"$TMP/r.json" 2>"$TMP/r.err" &
  rp=$!
  PIDS+=("$rp")
  wait "$sp" || { cat "$TMP/s.err" >&2; return 1; }
  wait "$rp" || { cat "$TMP/r.err" >&2; return 1; }
  t1=$(now)
  forget "$sp"
  forget "$rp"
  mkdir -p "$LOGS"
  for end in s r; do
    for f in json err time; do
      cp "$TMP/$end.$f" "$LOGS/$round-$tool-$([ $end = s ] && echo send || echo receive).$f"
    done
  done
  wire=$(grep '"done"' "$TMP/s.json" | python3 -c 'import json,sys; print(json.loads(sys.stdin.readline())["wire_bytes"])')
  record "$round" "$tool" "$(sub "$t1" "$t0")" "$(cpu_of "$TMP/s.time")" \
    "$(cpu_of "$TMP/r.time")" "$(rss_of "$TMP/s.time")" "$(rss_of "$TMP/r.time")" "$wire" "$(sync_secs)"
}

run_scan() { # round
  local round=$1 out
  out=$(/usr/bin/time -f "$TFMT" -o "$TMP/s.time" "$BIN/examples/scan_bench" "$SRC")
  record "$round" scan "$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["secs"])' "$out")" \
    "$(cpu_of "$TMP/s.time")" 0 "$(rss_of "$TMP/s.time")" 0 null 0
}

run_b3sum() { # round
  local round=$1 t0 t1
  t0=$(now)
  /usr/bin/time -f "$TFMT" -o "$TMP/s.time" bash -c \
    "find '$SRC' -type f -print0 | xargs -0 '$B3SUM' --num-threads 2 >/dev/null"
  t1=$(now)
  record "$round" b3sum "$(sub "$t1" "$t0")" "$(cpu_of "$TMP/s.time")" 0 \
    "$(rss_of "$TMP/s.time")" 0 null 0
}

run_proto() { # round [extra-flag [binary tool-name]]
  local round=$1 flag=${2:-} bin=${3:-$BIN/examples/proto_bench} tool=${4:-proto} out
  [ -n "$flag" ] && tool=protoraw
  fresh_dest
  out=$(/usr/bin/time -f "$TFMT" -o "$TMP/s.time" "$bin" "$SRC" "$DEST" $flag)
  # Wall and CPU of the transfer alone (the example scans first and times the scan apart).
  record "$round" "$tool" \
    "$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["secs"])' "$out")" \
    "$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["cpu_s"])' "$out")" 0 \
    "$(rss_of "$TMP/s.time")" 0 \
    "$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["wire_bytes"])' "$out")" "$(sync_secs)"
}

{
  echo "machine: $(nproc) cpus, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), kernel $(uname -r)"
  echo "start: $(date -u +%FT%TZ) uptime:$(uptime)"
  echo "source: $SRC ($FILES files, $BYTES bytes); rounds: $ROUNDS; only: $ONLY${BASE:+; baseline: $BASE}"
} | tee "$RESULTS.txt" >&2

# One tool of one round (ferry and proto run next to their baselines, if any).
run_tool() { # round tool
  local round=$1
  case "$2" in
    tar) run_tar "$round" 0 ;;
    tarzstd) run_tar "$round" 1 ;;
    rsync) run_rsync "$round" "" ;;
    rsyncgcm) run_rsync "$round" aes128-gcm@openssh.com ;;
    scp) run_scp "$round" ;;
    # With a baseline, the two builds swap places every round so neither always goes first.
    ferry)
      if [ -n "$BASE" ] && [ $((round % 2)) = 0 ]; then
        run_ferry "$round" "$BASE/ferry" ferry@base
        run_ferry "$round"
      else
        run_ferry "$round"
        [ -z "$BASE" ] || run_ferry "$round" "$BASE/ferry" ferry@base
      fi ;;
    scan) run_scan "$round" ;;
    b3sum) run_b3sum "$round" ;;
    proto)
      if [ -n "$BASE" ] && [ $((round % 2)) = 0 ]; then
        run_proto "$round" "" "$BASE/proto_bench" proto@base
        run_proto "$round"
      else
        run_proto "$round"
        [ -z "$BASE" ] || run_proto "$round" "" "$BASE/proto_bench" proto@base
      fi ;;
    protoraw) run_proto "$round" --no-compress ;;
  esac
}

# Every other round runs the tools in reverse order, so that none always runs first (or last)
# in a batch on a machine whose load drifts.
ORDER=(tar tarzstd rsync rsyncgcm scp ferry scan b3sum proto protoraw)
for round in $(seq "$([ "$WARMUP" = 0 ] && echo 1 || echo 0)" "$ROUNDS"); do
  echo "round $round$([ "$round" = 0 ] && echo ' (warm-up, not recorded)') — $(uptime)" >&2
  tools=("${ORDER[@]}")
  if [ $((round % 2)) = 0 ]; then
    tools=()
    for ((k = ${#ORDER[@]} - 1; k >= 0; k--)); do tools+=("${ORDER[k]}"); done
  fi
  for t in "${tools[@]}"; do
    want "$t" && run_tool "$round" "$t"
  done
done
echo "end: $(date -u +%FT%TZ) uptime:$(uptime)" | tee -a "$RESULTS.txt" >&2
fresh_dest

python3 "$REPO/scripts/bench-summary.py" "$RESULTS" | tee -a "$RESULTS.txt"
echo "results: $RESULTS" >&2
