#!/usr/bin/env bash
# ferry's goodput over a rate-limited, lossy namespace link, next to tar | nc on the same link in
# the same batch. Root only (skips otherwise); everything it creates is removed on exit.
#
#   scripts/bench-link.sh [--rates "100mbit 1gbit"] [--losses "0 0.01"] [--rounds 3]
#                         [--seconds 10] [--tag link]
#
# Per rate, every round runs, for each loss in turn, back to back on the same link:
#   ferry on incompressible data (4 random files), ferry on text-heavy data (chat-export-like
#   text, zstd-compressible), tar | nc on the same two data sets.
# Data size per rate: what the link moves in --seconds (at most 512 MiB). Loss is random,
# per packet, in both directions (iptables statistic on each end's input, TCP and UDP alike).
# Goodput = data bytes / wall seconds from the sender's start (ferry: scan and pairing count) to
# the receiver's exit. Results: bench-results/<tag>-<time>.jsonl (one line per run) and a .txt
# summary; scripts/bench-plot.py draws them.
set -euo pipefail
source "$(dirname "$0")/bench-lan-lib.sh"

RATES="100mbit 1gbit"
LOSSES="0 0.01"
ROUNDS=3
SECONDS_PER_RUN=10
TAG=link
while [ $# -gt 0 ]; do
  case "$1" in
    --rates) RATES=$2; shift 2 ;;
    --losses) LOSSES=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --seconds) SECONDS_PER_RUN=$2; shift 2 ;;
    --tag) TAG=$2; shift 2 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done

lan_require_root
lan_install_tools
lan_setup
RESULTS="$REPO/bench-results/$TAG-$(date -u +%Y%m%dT%H%M%SZ).jsonl"
{
  machine_line
  echo "start: $(date -u +%FT%TZ) uptime:$(uptime)"
  echo "rates: $RATES; losses: $LOSSES; rounds: $ROUNDS; ~$SECONDS_PER_RUN s of link time per run"
} | tee "$RESULTS.txt" >&2

for rate in $RATES; do
  bits=$(rate_bits "$rate")
  mb=$(awk -v b="$bits" -v s="$SECONDS_PER_RUN" 'BEGIN { m = b / 8 * s / 1048576; if (m > 512) m = 512; printf "%d", (m + 3) / 4 * 4 }')
  RAND="$WORK/link-random-${mb}MiB"
  TEXT="$WORK/link-text-${mb}MiB"
  make_random_src "$RAND" "$mb"
  make_text_src "$TEXT" "$mb"
  echo "link $rate, $mb MiB per data set — $(uptime)" >&2
  # Round 0 warms the page cache and the link; not recorded. Losses alternate within a round, so
  # a 0% / 1% comparison is not confounded by the machine's load drifting between sub-batches.
  for round in $(seq 0 "$ROUNDS"); do
    for loss in $LOSSES; do
      lan_link "$rate" "$loss"
      for tool in ferry tar; do
        for data in random text; do
          src=$RAND
          [ "$data" = text ] && src=$TEXT
          bytes=$(tree_bytes "$src")
          if [ "$tool" = ferry ]; then
            ferry_run "$src" none
            wire=$LAN_WIRE
          else
            tar_run "$src"
            wire=null
          fi
          line=$(printf '{"bench":"link","round":%s,"tool":"%s","data":"%s","rate":"%s","rate_bits":%s,"loss":%s,"bytes":%s,"wall_s":%s,"wire_bytes":%s,"cpu_send_s":%s,"cpu_recv_s":%s,"rss_send_kb":%s,"rss_recv_kb":%s,"load1":%s}' \
            "$round" "$tool" "$data" "$rate" "$bits" "$loss" "$bytes" "$LAN_WALL" "$wire" \
            "$LAN_CPU_S" "$LAN_CPU_R" "$LAN_RSS_S" "$LAN_RSS_R" "$(load1)")
          echo "  $line" >&2
          [ "$round" -gt 0 ] && echo "$line" >>"$RESULTS"
        done
      done
    done
  done
done
echo "end: $(date -u +%FT%TZ) uptime:$(uptime)" | tee -a "$RESULTS.txt" >&2
python3 "$REPO/scripts/bench-lan-summary.py" "$RESULTS" | tee -a "$RESULTS.txt"
echo "results: $RESULTS" >&2
