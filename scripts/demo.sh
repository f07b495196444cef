#!/usr/bin/env bash
# Installs what is needed, builds ftvm and its guests, and runs the demo guests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
scripts/fetch-redis.sh     # the real Redis 7.0.15, built static with musl (for the last part)
cargo build --release -p ftvm
cargo xtask guests
echo
echo "== ftvm run --kernel target/guests/hello.elf (console below) =="
./target/release/ftvm run --kernel target/guests/hello.elf --cmdline "hello.wait_ms=1000"
echo "== exit status $? (0: the guest powered off) =="
echo
echo "== record and replay: ftvm record, then ftvm replay with no network =="
log="$(mktemp -d)/hello.log"
./target/release/ftvm record --log "$log" --kernel target/guests/hello.elf --cmdline hello.wait_ms=500 --console file:/dev/null
./target/release/ftvm replay "$log"
echo
echo "== a live snapshot of a guest computing in ring 3, then a restore in a fresh process =="
dir="$(mktemp -d)"
./target/release/ftvm run --kernel target/guests/compute.elf --cmdline compute.rounds=400 \
  --console "file:$dir/first.txt" --api-socket "$dir/vm.sock" &
for _ in $(seq 50); do ./target/release/ftvm ctl "$dir/vm.sock" status >/dev/null 2>&1 && break; sleep 0.1; done
sleep 1
./target/release/ftvm ctl "$dir/vm.sock" snapshot "$dir/snap"
wait
./target/release/ftvm run --restore "$dir/snap" --console "file:$dir/restored.txt"
echo "the run:      $(grep digest: "$dir/first.txt")"
echo "its restore:  $(grep digest: "$dir/restored.txt")"
rm -rf "$dir"
echo
echo "== the fault-tolerant pair: a protected kvstore VM, redis-benchmark, SIGKILL of the primary =="
scripts/pair-demo.sh
echo
echo "== the same pair protecting the real, unmodified Redis 7.0.15 (the guest kit's Linux personality) =="
DEMO_GUEST=redis scripts/pair-demo.sh
