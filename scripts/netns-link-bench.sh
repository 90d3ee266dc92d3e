#!/usr/bin/env bash
# ferry's goodput over a real (namespace) link: two network namespaces joined by a veth pair,
# each side rate-limited with tc tbf, random loss in both directions with iptables statistic.
# Compares congestion controllers. Root only; everything it creates is removed on exit.
#
#   scripts/netns-link-bench.sh            # 200 Mbit/s, 0.5 % loss, bbr and cubic, 2 rounds
#   RATE=100mbit LOSS=0 SIZE_MB=100 CC_LIST=bbr scripts/netns-link-bench.sh
#
# Addresses are 10.78.0.1/.2 inside the namespaces only; nothing leaves this machine.
set -euo pipefail
RATE=${RATE:-200mbit}
LOSS=${LOSS:-0.005}
SIZE_MB=${SIZE_MB:-150}
CC_LIST=${CC_LIST:-"bbr cubic"}
ROUNDS=${ROUNDS:-2}
cd "$(dirname "$0")/.."
FERRY=${FERRY:-$PWD/target/release/ferry}
[ "$(id -u)" -eq 0 ] || { echo "skip: needs root for network namespaces" >&2; exit 0; }
command -v ip >/dev/null && command -v tc >/dev/null && command -v iptables >/dev/null || bash scripts/install-test-deps.sh
[ -x "$FERRY" ] || cargo build --release --quiet
A=fba$$; B=fbb$$; VA=vfa$$; VB=vfb$$
W=$(mktemp -d /tmp/ferry-netns-bench.XXXXXX)
cleanup() {
  pkill -f "$W/" 2>/dev/null || true
  ip netns del "$A" 2>/dev/null || true
  ip netns del "$B" 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT
ip netns add "$A"; ip netns add "$B"
ip link add "$VA" type veth peer name "$VB"
ip link set "$VA" netns "$A"; ip link set "$VB" netns "$B"
ip -n "$A" addr add 10.78.0.1/24 dev "$VA"; ip -n "$B" addr add 10.78.0.2/24 dev "$VB"
for ns in "$A" "$B"; do ip -n "$ns" link set lo up; done
ip -n "$A" link set "$VA" up; ip -n "$B" link set "$VB" up
tc -n "$A" qdisc add dev "$VA" root tbf rate "$RATE" burst 64kb latency 20ms
tc -n "$B" qdisc add dev "$VB" root tbf rate "$RATE" burst 64kb latency 20ms
if [ "$LOSS" != "0" ]; then
  for ns in "$A" "$B"; do
    ip netns exec "$ns" iptables -A INPUT -p udp -m statistic --mode random --probability "$LOSS" -j DROP
  done
fi
mkdir -p "$W/src"
head -c "$((SIZE_MB * 1024 * 1024))" /dev/urandom > "$W/src/video.mp4"   # incompressible
rate_bits=$(echo "$RATE" | awk '{ v = $0 + 0; if ($0 ~ /gbit/) v *= 1e9; else if ($0 ~ /mbit/) v *= 1e6; else if ($0 ~ /kbit/) v *= 1e3; print v }')
echo "link: $RATE, loss $LOSS each way, $SIZE_MB MiB incompressible, $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
printf "%-6s %-5s %9s %10s %8s\n" cc round seconds "goodput" "of link"
for cc in $CC_LIST; do
  for r in $(seq 1 "$ROUNDS"); do
    rm -rf "$W/hA" "$W/hB" "$W/dst"
    FERRY_HOME="$W/hA" ip netns exec "$A" "$FERRY" send "$W/src" --listen 10.78.0.1:7000 --no-mdns --json \
      --code 1234-5678 --congestion "$cc" > "$W/send.log" 2>"$W/send.err" &
    spid=$!
    for _ in $(seq 1 100); do grep -q '"listening"' "$W/send.log" 2>/dev/null && break; sleep 0.1; done
    t0=$(date +%s.%N)
    FERRY_HOME="$W/hB" ip netns exec "$B" "$FERRY" receive "$W/dst" --connect 10.78.0.1:7000 --code 1234-5678 \
      --json > "$W/recv.log" 2>"$W/recv.err" || { echo "receive failed"; cat "$W/recv.err"; exit 1; }
    t1=$(date +%s.%N)
    wait "$spid" || true
    awk -v cc="$cc" -v r="$r" -v t0="$t0" -v t1="$t1" -v b="$((SIZE_MB * 1024 * 1024))" -v link="$rate_bits" \
      'BEGIN { s = t1 - t0; printf "%-6s %-5s %9.2f %7.1f Mb/s %7.1f %%\n", cc, r, s, b * 8 / s / 1e6, b * 8 / s / link * 100 }'

  done
done
