#!/usr/bin/env bash
# Installs the system tools ferry's tests use (network namespaces, firewall rules, sqlite CLI, nc,
# an exFAT file system in user space for the case-insensitive destination test, tmux for the
# interactive flows),
# only when missing and only when we can (root with apt-get). Tests that still lack a tool skip
# with a printed reason.
set -euo pipefail
need=()
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v iptables >/dev/null 2>&1 || need+=(iptables)
command -v sqlite3 >/dev/null 2>&1 || need+=(sqlite3)
command -v nc >/dev/null 2>&1 || need+=(netcat-openbsd)
command -v mount.exfat-fuse >/dev/null 2>&1 || need+=(exfat-fuse)
command -v mkfs.exfat >/dev/null 2>&1 || need+=(exfatprogs)
# tmux: the interactive flows (the code prompt) are tested in a real terminal.
command -v tmux >/dev/null 2>&1 || need+=(tmux)
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "install-test-deps: missing ${need[*]} and cannot install (not root or no apt-get); tests that need them will skip" >&2
  exit 0
fi
echo "install-test-deps: installing ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
