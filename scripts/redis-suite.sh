#!/usr/bin/env bash
# Runs Redis's own test suite (the upstream tests/ of the Redis 7.0.15 source that
# scripts/fetch-redis.sh unpacked into target/redis-src) against the real Redis running
# under `ftvm run` in the guest kit's Linux personality, over the namespaced test network.
#
#   scripts/redis-suite.sh [--prefix P] [--work DIR] [--record] [--keep] [-- RUNTEST-ARGS...]
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
# (scripts/topology.sh, default rsuite); --keep leaves it up. --record runs the guest under
# `ftvm record` (log DIR/suite.log) instead, then stops it (SIGTERM: Redis shuts down) and
# replays the log with `ftvm replay`, which must say it replayed exactly.
set -euo pipefail
cd "$(dirname "$0")/.."
prefix=rsuite
keep=0
record=0
work=target/redis-suite
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) prefix="$2"; shift 2 ;;
    --work) work="$2"; shift 2 ;;
    --keep) keep=1; shift ;;
    --record) record=1; shift ;;
    --) shift; break ;;
    -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
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
# 2 GiB: the fork of a BGSAVE for a replica copies the whole process aside (the
# replication units fill it past what a 1 GiB VM's personality heap holds twice).
if [ "$record" = 1 ]; then
  rm -f "$work"/suite.log*
  session=(record --log "$work/suite.log")
else
  session=(run)
fi
ip netns exec "$prefix-h1" "$ftvm" "${session[@]}" --kernel target/guests/redis.elf --initrd target/guests/redis.cpio \
  --mem 2G --disk "$disk" --net tap=tap0 --rng --console "file:$console" \
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
# Some tests run src/redis-cli; fetch-redis.sh builds only the server: use the client
# redis-tools installed (the same major version's protocol).
if [ ! -e "$src/src/redis-cli" ] && command -v redis-cli >/dev/null; then
  ln -s "$(command -v redis-cli)" "$src/src/redis-cli"
fi
cd "$src"
set +e
ip netns exec "$prefix-c" ./runtest --host 10.0.0.2 --port 6379 --timeout 300 --no-latency \
  --skipfile "$skipfile" "$@"
status=$?
set -e
cd - >/dev/null
if [ "$record" = 1 ]; then
  # A graceful stop: Redis saves and exits, the guest powers off, the log ends there.
  kill -TERM "$vm"
  set +e; wait "$vm"; stopped=$?; set -e
  vm=""
  [ "$stopped" = 0 ] || { echo "redis-suite: the recording ended with status $stopped:" >&2; tail -5 "$work/ftvm.stderr" >&2; exit 1; }
  echo "redis-suite: replaying $work/suite.log ($(du -h "$work/suite.log" | cut -f1))"
  set +e; "$ftvm" replay "$work/suite.log" >"$work/replay.txt" 2>&1; replayed=$?; set -e
  tail -3 "$work/replay.txt"
  [ "$replayed" = 0 ] || { echo "redis-suite: the replay did not replay exactly (status $replayed)" >&2; exit 1; }
fi
exit "$status"
