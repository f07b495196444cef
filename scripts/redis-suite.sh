#!/usr/bin/env bash
# Runs Redis's own test suite (the upstream tests/ of the Redis 7.0.15 source that
# scripts/fetch-redis.sh unpacked into target/redis-src) against the real Redis running
# under `ftvm run` in the guest kit's Linux personality, over the namespaced test network.
#
#   scripts/redis-suite.sh [--prefix P] [--work DIR] [--keep] [-- RUNTEST-ARGS...]
#
# Without RUNTEST-ARGS it runs every unit (about an hour here); give `--single UNIT`
# (repeatable) for some, e.g. `scripts/redis-suite.sh -- --single unit/protocol`. The tests
# run in the suite's external-server mode (--host): the ones that start, restart or
# reconfigure servers of their own (tagged external:skip) are left out by the suite itself.
# Tests this guest cannot pass yet are listed, each with its reason, in
# scripts/redis-suite.skip (given to the suite with --skipfile). Needs root, KVM, tclsh
# (scripts/deps.sh installs it), target/guests/redis.{elf,cpio} (`cargo xtask guests`) and
# target/release/ftvm (or FTVM=PATH). Exits with the suite's status; the guest's console
# is in DIR/console.txt (default target/redis-suite). --prefix names the test network
# (scripts/topology.sh, default rsuite); --keep leaves it up.
set -euo pipefail
cd "$(dirname "$0")/.."
prefix=rsuite
keep=0
work=target/redis-suite
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) prefix="$2"; shift 2 ;;
    --work) work="$2"; shift 2 ;;
    --keep) keep=1; shift ;;
    --) shift; break ;;
    -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
ftvm="${FTVM:-target/release/ftvm}"
src=target/redis-src
for need in "$ftvm" target/guests/redis.elf target/guests/redis.cpio "$src/runtest"; do
  [ -e "$need" ] || { echo "redis-suite: $need is missing (scripts/fetch-redis.sh, cargo xtask guests, cargo build --release)" >&2; exit 1; }
done
command -v tclsh >/dev/null || { echo "redis-suite: tclsh is missing (scripts/deps.sh installs tcl)" >&2; exit 1; }

mkdir -p "$work"
work="$(cd "$work" && pwd)"
console="$work/console.txt"
disk="$work/data.img"
rm -f "$disk" "$console"
truncate -s 1G "$disk"
vm=""
cleanup() {
  if [ -n "$vm" ]; then kill "$vm" 2>/dev/null || true; wait "$vm" 2>/dev/null || true; fi
  [ "$keep" = 1 ] || scripts/topology.sh down "$prefix" >/dev/null 2>&1 || true
}
trap cleanup EXIT
scripts/topology.sh down "$prefix" >/dev/null 2>&1 || true
scripts/topology.sh up "$prefix" 1 >/dev/null
# DEBUG is what most of the suite's checks use (DEBUG RELOAD, DIGEST, SLEEP, OBJECT ...).
ip netns exec "$prefix-h1" "$ftvm" run --kernel target/guests/redis.elf --initrd target/guests/redis.cpio \
  --mem 1G --disk "$disk" --net tap=tap0 --rng --console "file:$console" \
  --cmdline "ip=10.0.0.2/24 -- /redis.conf --enable-debug-command yes" 2>"$work/ftvm.stderr" &
vm=$!
for _ in $(seq 1 600); do
  if ip netns exec "$prefix-c" redis-cli -h 10.0.0.2 PING 2>/dev/null | grep -q PONG; then break; fi
  kill -0 "$vm" 2>/dev/null || { echo "redis-suite: the VM ended before serving:" >&2; cat "$console" "$work/ftvm.stderr" >&2; exit 1; }
  sleep 0.1
done
ip netns exec "$prefix-c" redis-cli -h 10.0.0.2 PING | grep -q PONG || { echo "redis-suite: no PONG from the guest in 60 s" >&2; exit 1; }
echo "redis-suite: the guest serves on 10.0.0.2:6379; running Redis's tests against it"
skipfile="$PWD/scripts/redis-suite.skip"
cd "$src"
set +e
ip netns exec "$prefix-c" ./runtest --host 10.0.0.2 --port 6379 --timeout 300 --no-latency \
  --skipfile "$skipfile" "$@"
status=$?
set -e
exit "$status"
