#!/usr/bin/env bash
# The fault-tolerant pair, end to end, on the namespaced test network (scripts/topology.sh):
# a protected kvstore VM, or the real Redis with DEMO_GUEST=redis (primary on host 1, backup on host 2, replication over their own
# link), driven by redis-cli and redis-benchmark from the client namespace; then the primary
# is killed with SIGKILL, the backup takes over; a new backup on host 1 is brought up to date
# by a live state transfer (re-protection) and the live side is killed again. The demo checks
# that one client connection survived both failovers, that every acknowledged write is still
# there and that clients keep being served. Needs root and /dev/kvm.
set -euo pipefail
cd "$(dirname "$0")/.."
F="$PWD/target/release/ftvm"
G="$PWD/target/guests"
P="demo$$"
P="${P:0:8}"
W="$(mktemp -d)"
cleanup() {
  pkill -9 -f "ftvm (primary|backup) .*$W" 2>/dev/null || true
  scripts/topology.sh down "$P" >/dev/null 2>&1 || true
  rm -rf "$W"
}
trap cleanup EXIT
[ -x "$F" ] && [ -f "$G/kvstore.elf" ] || { echo "build first: cargo build --release -p ftvm && cargo xtask guests" >&2; exit 1; }
# The guest: kvstore (ours), or with DEMO_GUEST=redis the real, unmodified Redis 7.0.15 under
# the guest kit's Linux personality (docs/linux-personality.md).
case "${DEMO_GUEST:-kvstore}" in
  kvstore) image=(--kernel "$G/kvstore.elf") ;;
  redis)
    [ -f "$G/redis.elf" ] && [ -f "$G/redis.cpio" ] ||
      { echo "build the real Redis first: scripts/fetch-redis.sh && cargo xtask guests" >&2; exit 1; }
    image=(--kernel "$G/redis.elf" --initrd "$G/redis.cpio" --mem 1G) ;;
  *) echo "DEMO_GUEST is kvstore or redis, not ${DEMO_GUEST}" >&2; exit 2 ;;
esac

scripts/topology.sh up "$P" 2
truncate -s 64M "$W/disk-primary.img"
cp "$W/disk-primary.img" "$W/disk-backup.img"
openssl rand -hex 32 > "$W/pair.key" 2>/dev/null || head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$W/pair.key"
chmod 600 "$W/pair.key"
# Both "hosts" are namespaces of this machine: the lock file is on storage both see (--shared-lock).
vm=("${image[@]}" --cmdline "ip=10.0.0.2/24" --net tap=tap0 --rng --arbiter "$W/arbiter.lock" --shared-lock
    --key-file "$W/pair.key")
ip netns exec "$P-h2" "$F" backup --listen 10.99.0.2:7000 "${vm[@]}" --disk "$W/disk-backup.img" \
  --api-socket "$W/backup.sock" --console "file:$W/backup.console" 2> >(sed 's/^/[backup]  /' >&2) &
disown $!
sleep 0.5
ip netns exec "$P-h1" "$F" primary --backup 10.99.0.2:7000 "${vm[@]}" --disk "$W/disk-primary.img" \
  --console "file:$W/primary.console" 2> >(sed 's/^/[primary] /' >&2) &
disown $!
client() { ip netns exec "$P-c" "$@"; }
for _ in $(seq 50); do client redis-cli -h 10.0.0.2 PING >/dev/null 2>&1 && break; sleep 0.2; done
echo "== the protected VM answers: $(client redis-cli -h 10.0.0.2 PING)"
for i in $(seq 1 20); do client redis-cli -h 10.0.0.2 SET "key$i" "value$i" >/dev/null; done
echo "== 20 acknowledged SETs; redis-benchmark against the pair:"
client redis-benchmark -h 10.0.0.2 -t set,get -n 5000 -c 20 -q 2>/dev/null | tr '\r' '\n' | grep -E '^(SET|GET): [0-9]'
echo "== a client holds ONE TCP connection doing INCR/SET (scripts/kv-checker.py); killing the primary with SIGKILL"
client python3 scripts/kv-checker.py 10.0.0.2 6379 12 > "$W/checker.json" &
checker=$!
sleep 2
pkill -9 -f "ftvm primary .*$W"
sleep 1.5
echo "== re-protection: a new backup on host 1 (its disk is the dead primary's, stale), then ftvm ctl protect"
ip netns exec "$P-h1" "$F" backup --listen 10.99.0.1:7001 "${vm[@]}" --disk "$W/disk-primary.img" \
  --console "file:$W/backup2.console" 2> >(sed 's/^/[backup2] /' >&2) &
disown $!
sleep 0.5
"$F" ctl "$W/backup.sock" protect 10.99.0.1:7001
"$F" ctl "$W/backup.sock" status | grep -E '^(role|failovers|replay lag):'
sleep 2
echo "== killing the live side (the first backup) with SIGKILL: the second failover"
pkill -9 -f "ftvm backup --listen 10.99.0.2:7000 .*$W"
wait "$checker" && held=ok || held=broken
echo "== the same connection after both failovers: $(cat "$W/checker.json")"
missing=0
for i in $(seq 1 20); do
  [ "$(client redis-cli -h 10.0.0.2 GET "key$i")" = "value$i" ] || missing=$((missing + 1))
done
echo "== after two failovers: $((20 - missing)) of 20 acknowledged writes readable"
client redis-benchmark -h 10.0.0.2 -t set,get -n 5000 -c 20 -q 2>/dev/null | tr '\r' '\n' | grep -E '^(SET|GET): [0-9]'
if [ "$missing" = 0 ] && [ "$held" = ok ]; then
  echo "== demo passed: the VM survived the loss of both hosts in turn; the client's connection was never reset"
else
  echo "== demo FAILED" >&2
  exit 1
fi
