#!/usr/bin/env bash
# What one interruption costs ferry: seconds lost and bytes re-sent, per kind of interruption,
# on a rate-limited namespace link. Root only (skips otherwise); everything it creates is removed
# on exit.
#
#   scripts/bench-resume.sh [--rate 100mbit] [--size 128MiB] [--rounds 3] [--at 0.4]
#                           [--blackout 3] [--tag resume]
#
# Every round runs, back to back, the same migration (a generated chat history) A → B:
#   none                a clean run (the reference of this round)
#   blackout:S@F        every packet to and from B dropped for S seconds once F of the bytes are in
#   killrecv@F          kill -9 of the receiver at F, restarted at once (same command)
#   killsend@F          kill -9 of the sender at F, restarted at once (same command, same port)
# Seconds lost = wall time minus the clean run's of the same round (minus the outage itself for
# a blackout). Bytes re-sent = bytes that reached B's network interface (iptables counter, all
# packets, headers included) minus the clean run's. Results: bench-results/<tag>-<time>.jsonl.
set -euo pipefail
source "$(dirname "$0")/bench-lan-lib.sh"

RATE=100mbit
SIZE=128MiB
ROUNDS=3
AT=0.4
BLACKOUT=3
TAG=resume
while [ $# -gt 0 ]; do
  case "$1" in
    --rate) RATE=$2; shift 2 ;;
    --size) SIZE=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --at) AT=$2; shift 2 ;;
    --blackout) BLACKOUT=$2; shift 2 ;;
    --tag) TAG=$2; shift 2 ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done

lan_require_root
lan_install_tools
lan_setup
lan_count_init
lan_link "$RATE" 0
SRC="$WORK/resume-src-$SIZE"
if [ ! -f "$SRC.done" ]; then
  rm -rf "$SRC"
  "$REPO/target/release/examples/gen_history" "$SRC" --size "$SIZE" >&2
  touch "$SRC.done"
fi
BYTES=$(tree_bytes "$SRC")
RESULTS="$REPO/bench-results/$TAG-$(date -u +%Y%m%dT%H%M%SZ).jsonl"
{
  machine_line
  echo "start: $(date -u +%FT%TZ) uptime:$(uptime)"
  echo "link $RATE, no loss; source $SRC ($(tree_files "$SRC") files, $BYTES bytes); rounds: $ROUNDS; interruptions at $AT"
} | tee "$RESULTS.txt" >&2

KINDS="none blackout:$BLACKOUT@$AT killrecv@$AT killsend@$AT"
for round in $(seq 0 "$ROUNDS"); do
  echo "round $round$([ "$round" = 0 ] && echo ' (warm-up, not recorded)') — $(uptime)" >&2
  for kind in $KINDS; do
    lan_count_reset
    LAN_EVENT_T=
    ferry_run "$SRC" "$kind"
    wire_in=$(lan_count_bytes)
    outage=0
    case "$kind" in blackout:*) outage=$BLACKOUT ;; esac
    line=$(printf '{"bench":"resume","round":%s,"kind":"%s","rate":"%s","bytes":%s,"wall_s":%s,"outage_s":%s,"wire_in_bytes":%s,"last_sender_wire_bytes":%s,"rss_send_kb":%s,"rss_recv_kb":%s,"load1":%s}' \
      "$round" "${kind%%[:@]*}" "$RATE" "$BYTES" "$LAN_WALL" "$outage" "$wire_in" "$LAN_WIRE" \
      "$LAN_RSS_S" "$LAN_RSS_R" "$(load1)")
    echo "  $line" >&2
    [ "$round" -gt 0 ] && echo "$line" >>"$RESULTS"
  done
done
echo "end: $(date -u +%FT%TZ) uptime:$(uptime)" | tee -a "$RESULTS.txt" >&2
python3 "$REPO/scripts/bench-lan-summary.py" "$RESULTS" | tee -a "$RESULTS.txt"
echo "results: $RESULTS" >&2
