#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for N seconds each (default 60) and prints executions
# and crashes per target. Needs libFuzzer's nightly flags: on a stable toolchain it sets
# RUSTC_BOOTSTRAP=1 (works with the toolchain this project uses; a real nightly is used when
# installed). Installs cargo-fuzz from crates.io if it is missing.
#
#   scripts/fuzz.sh [seconds] [target...]
#
# The fuzzers start from the committed seeds in fuzz/corpus/<target>/ (new corpus entries are
# git-ignored). A crash leaves fuzz/artifacts/<target>/crash-*: copy it to
# fuzz/regressions/<target>/ (the stable tests replay every file there), fix, commit.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-60}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(frames manifest receiver sender ticket)
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi
toolchain=()
if rustup toolchain list 2>/dev/null | grep -q nightly; then
  toolchain=(+nightly)
else
  export RUSTC_BOOTSTRAP=1
fi
mkdir -p fuzz/logs
status=0
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t"
  log="fuzz/logs/$t.log"
  # -rss_limit_mb: a harness that allocates without bound fails here, not only in CI.
  if cargo "${toolchain[@]}" fuzz run "$t" "fuzz/corpus/$t" -- \
      -max_total_time="$secs" -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1 \
      >"$log" 2>&1; then
    result=ok
  else
    result="CRASH (see $log and fuzz/artifacts/$t/)"
    status=1
  fi
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
  rate=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1)
  echo "$t: ${execs:-?} executions (${rate:-?}/s, ${cov:-cov ?}) in ${secs}s: $result"
done
exit $status
