#!/usr/bin/env bash
# Cost growth and memory: ferry, tar | nc and rsync over ssh (loopback, bench-loopback.sh; root
# only) on generated histories of each size, one round each, no warm-up (the larger ones do not
# stay in the page cache anyway). Records wall time (→ seconds per GiB) and peak RSS of both
# ends. Each source is generated, measured and deleted before the next size.
#
#   scripts/bench-sizes.sh [--sizes "1GiB 4GiB 10GiB"] [--rounds 1]
#
# A size is skipped, with the reason printed, when the disk cannot hold it twice (source and
# destination) plus 4 GiB of headroom for others sharing the disk.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZES="1GiB 4GiB 10GiB"
ROUNDS=1
while [ $# -gt 0 ]; do
  case "$1" in
    --sizes) SIZES=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
WORK=${WORK:-$PWD/target/bench-work}
mkdir -p "$WORK"
for size in $SIZES; do
  gib=$(echo "$size" | sed 's/GiB$//')
  free_gib=$(df --output=avail -B1G "$WORK" | tail -1 | tr -d ' ')
  if [ "$free_gib" -lt $((2 * gib + 4)) ]; then
    echo "bench-sizes: skipping $size: $free_gib GiB free, need $((2 * gib + 4)) (source + destination + headroom)" >&2
    continue
  fi
  scripts/bench-loopback.sh --size "$size" --rounds "$ROUNDS" --warmup 0 --only tar,rsync,ferry \
    --tag "sizes-$size" --workdir "$WORK" || echo "bench-sizes: $size failed" >&2
  rm -rf "$WORK/src-$size-small0" "$WORK/src-$size-small0.done"
done
