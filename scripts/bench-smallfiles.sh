#!/usr/bin/env bash
# Many small files: a 64 MiB chat history plus N sticker-cache files of 2–20 KB (default
# 200 000), moved over loopback by tar | nc, rsync over ssh (default cipher) and ferry, back to
# back per round (bench-loopback.sh does the work; root only). Reports files/s and the ratios.
#
#   scripts/bench-smallfiles.sh [--files 200000] [--rounds 2] [--keep]
#
# The generated source (≈2.2 GB for 200 000 files) is deleted afterwards unless --keep.
set -euo pipefail
cd "$(dirname "$0")/.."
FILES=200000
ROUNDS=2
KEEP=
while [ $# -gt 0 ]; do
  case "$1" in
    --files) FILES=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --keep) KEEP=1; shift ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
WORK=${WORK:-$PWD/target/bench-work}
# The source is already in the page cache right after generation: no warm-up round.
scripts/bench-loopback.sh --size 64MiB --small-files "$FILES" --rounds "$ROUNDS" --warmup 0 \
  --only tar,rsync,ferry --tag "smallfiles-$FILES" --workdir "$WORK"
[ -n "$KEEP" ] || rm -rf "$WORK/src-64MiB-small$FILES" "$WORK/src-64MiB-small$FILES.done"
