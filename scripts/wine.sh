#!/usr/bin/env bash
# ferry on Windows, tested under Wine on Linux.
#
#   scripts/wine.sh setup          install what the Windows job needs (root + apt-get: mingw-w64,
#                                  wine; rustup: the x86_64-pc-windows-gnu target), build the
#                                  ProcessPrng shim and create the Wine prefix
#   scripts/wine.sh build          build ferry.exe (debug) into target/windows/
#   scripts/wine.sh test-sync      run ferry-sync's tests as Windows programs under Wine
#   scripts/wine.sh run EXE ARGS…  run one Windows program under Wine (also the cargo runner)
#   scripts/wine.sh ci             setup, build, test-sync: the CI job (the Linux<->Windows
#                                  migrations run in `cargo test`, tests/windows.rs, with the
#                                  ferry.exe this builds)
#
# When the job cannot run here (no root/apt-get for the packages, rustup cannot add the target),
# it says why, writes the reason to target/windows/skip-reason (tests/windows.rs prints it) and
# exits 0: a machine without the Windows tool chain skips the job, it does not fail CI.
#
# Why a shim: Rust's std on Windows takes random bytes from `ProcessPrng` in
# bcryptprimitives.dll, which Wine 8 (Debian 12's) lacks, so no Rust program starts. The shim
# (scripts/wine/processprng.c) exports that one function on top of RtlGenRandom; `run` puts it
# next to the .exe. It is for Wine only and never shipped.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
target_dir="${FERRY_WINDOWS_TARGET_DIR:-$root/target/windows}"
triple=x86_64-pc-windows-gnu
shim="$target_dir/wine/bcryptprimitives.dll"
export WINEPREFIX="${WINEPREFIX:-$target_dir/wine/prefix}"
export WINEDEBUG="${WINEDEBUG:--all}"
# Wine must never open a window or ask to install Mono/Gecko.
export WINEDLLOVERRIDES="${WINEDLLOVERRIDES:-mscoree,mshtml=}"
export DISPLAY=

skip() {
  mkdir -p "$target_dir"
  echo "wine.sh: SKIP the Windows job: $*" | tee "$target_dir/skip-reason" >&2
  exit 0
}

setup() {
  rm -f "$target_dir/skip-reason"
  local need=()
  command -v x86_64-w64-mingw32-gcc >/dev/null 2>&1 || need+=(gcc-mingw-w64-x86-64)
  command -v wine >/dev/null 2>&1 || need+=(wine wine64)
  if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
      skip "missing ${need[*]} and cannot install them (not root or no apt-get)"
    fi
    echo "wine.sh: installing ${need[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null ||
      skip "apt-get could not install ${need[*]}"
  fi
  if ! rustup target list --installed 2>/dev/null | grep -qx "$triple"; then
    rustup target add "$triple" >&2 || skip "rustup cannot add the $triple target (no access to its server?)"
  fi
  mkdir -p "$(dirname "$shim")"
  if [ ! -f "$shim" ] || [ "$root/scripts/wine/processprng.c" -nt "$shim" ]; then
    x86_64-w64-mingw32-gcc -O2 -shared -o "$shim" "$root/scripts/wine/processprng.c" -ladvapi32
  fi
  if [ ! -f "$WINEPREFIX/system.reg" ]; then
    echo "wine.sh: creating the Wine prefix $WINEPREFIX" >&2
    wineboot -i >/dev/null 2>&1 || true
    wineserver -w || true
  fi
}

build() {
  [ -f "$target_dir/skip-reason" ] && exit 0
  cd "$root"
  CARGO_TARGET_DIR="$target_dir" cargo build --target "$triple" -p ferry --bin ferry "$@"
}

run() {
  local exe="$1"
  shift
  if [ ! -f "$shim" ]; then
    echo "wine.sh: no shim at $shim: run scripts/wine.sh setup first" >&2
    exit 127
  fi
  local dir
  dir="$(dirname "$exe")"
  cmp -s "$shim" "$dir/bcryptprimitives.dll" 2>/dev/null || cp "$shim" "$dir/bcryptprimitives.dll"
  exec wine "$exe" "$@"
}

test_sync() {
  [ -f "$target_dir/skip-reason" ] && exit 0
  cd "$root"
  CARGO_TARGET_DIR="$target_dir" \
    CARGO_TARGET_X86_64_PC_WINDOWS_GNU_RUNNER="$root/scripts/wine.sh run" \
    cargo test --target "$triple" -p ferry-sync "$@"
}

cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
  setup) setup ;;
  build) build "$@" ;;
  test-sync) test_sync "$@" ;;
  run) run "$@" ;;
  ci)
    setup
    build
    test_sync
    ;;
  *)
    sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
    ;;
esac
