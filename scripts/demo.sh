#!/usr/bin/env bash
# Installs what is needed, builds ftvm and its guests, and runs the demo guests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
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
echo "== the fault-tolerant pair: a protected kvstore VM, redis-benchmark, SIGKILL of the primary =="
scripts/pair-demo.sh
