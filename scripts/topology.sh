#!/usr/bin/env bash
# Builds and tears down the test network of design.md §7 on one machine, in network
# namespaces, so that tests can put VMs, clients and replication links on a "LAN" without
# touching the host's network. Needs root and iproute2.
#
#   scripts/topology.sh up   PREFIX [HOSTS]   # HOSTS defaults to 2
#   scripts/topology.sh down PREFIX
#   scripts/topology.sh show PREFIX
#
# PREFIX (at most 8 characters, letters and digits) makes every name unique, so tests can run
# in parallel. What `up` builds:
#
#   PREFIX-lan     the LAN: bridge br0, no address
#   PREFIX-c       the client: veth lan0 on the LAN, 10.0.0.100/24
#   PREFIX-h1..hN  one namespace per "host": bridge br0 holding the VM's TAP (tap0, persistent)
#                  and a veth uplink (up0) to the LAN bridge; the VM's guest is 10.0.0.2/24
#                  and whichever host runs it, the LAN reaches it through that host's bridge
#   repl           a veth pair between PREFIX-h1 and PREFIX-h2 (rep0 in each), 10.99.0.1/24 and
#                  10.99.0.2/24: the replication link, separate from the LAN so it can be cut
#                  (ip -n PREFIX-h1 link set rep0 down) without cutting clients
#
# Run a VM on host 1:   ip netns exec PREFIX-h1 ftvm run --net tap=tap0 ...
# Run a client:         ip netns exec PREFIX-c redis-cli -h 10.0.0.2 PING
set -euo pipefail

usage() { sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
[ $# -ge 2 ] || usage
cmd="$1"; p="$2"; hosts="${3:-2}"
[[ "$p" =~ ^[A-Za-z0-9]{1,8}$ ]] || { echo "PREFIX must be 1-8 letters or digits" >&2; exit 2; }
[[ "$hosts" =~ ^[1-9]$ ]] || { echo "HOSTS must be 1-9" >&2; exit 2; }

ns_exec() { ip netns exec "$@"; }

up() {
  if ip netns list | grep -qw "$p-lan"; then echo "topology $p already exists; run: $0 down $p" >&2; exit 1; fi
  ip netns add "$p-lan"
  ip -n "$p-lan" link add br0 type bridge
  ip -n "$p-lan" link set br0 up
  ip -n "$p-lan" link set lo up

  ip netns add "$p-c"
  ip link add "$p-cl" type veth peer name "$p-cx"
  ip link set "$p-cl" netns "$p-c"; ip -n "$p-c" link set "$p-cl" name lan0
  ip link set "$p-cx" netns "$p-lan"; ip -n "$p-lan" link set "$p-cx" master br0 up
  ip -n "$p-c" addr add 10.0.0.100/24 dev lan0
  ip -n "$p-c" link set lan0 up
  ip -n "$p-c" link set lo up

  for i in $(seq 1 "$hosts"); do
    local h="$p-h$i"
    ip netns add "$h"
    ip -n "$h" link set lo up
    ip -n "$h" link add br0 type bridge
    ip -n "$h" link set br0 up
    ip link add "$p-u$i" type veth peer name "$p-l$i"
    ip link set "$p-u$i" netns "$h"; ip -n "$h" link set "$p-u$i" name up0
    ip -n "$h" link set up0 master br0 up
    ip link set "$p-l$i" netns "$p-lan"; ip -n "$p-lan" link set "$p-l$i" master br0 up
    ns_exec "$h" ip tuntap add dev tap0 mode tap
    ip -n "$h" link set tap0 master br0 up
  done

  if [ "$hosts" -ge 2 ]; then
    ip link add "$p-r1" type veth peer name "$p-r2"
    for i in 1 2; do
      ip link set "$p-r$i" netns "$p-h$i"
      ip -n "$p-h$i" link set "$p-r$i" name rep0
      ip -n "$p-h$i" addr add "10.99.0.$i/24" dev rep0
      ip -n "$p-h$i" link set rep0 up
    done
  fi
  echo "topology $p up: LAN $p-lan, client $p-c (10.0.0.100), hosts $(seq -s ' ' -f "$p-h%g" 1 "$hosts")"
}

down() {
  local found=0
  for ns in $(ip netns list | awk '{print $1}' | grep -E "^$p-(lan|c|h[0-9])$" || true); do
    # Kill what still runs inside (VMs, clients) so the namespace can go.
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
    ip netns del "$ns" && found=1
  done
  [ $found = 1 ] && echo "topology $p down" || echo "topology $p: nothing to remove"
}

show() {
  for ns in $(ip netns list | awk '{print $1}' | grep -E "^$p-" || true); do
    echo "== $ns"; ip -n "$ns" -br addr
  done
}

case "$cmd" in
  up) up ;;
  down) down ;;
  show) show ;;
  *) usage ;;
esac
