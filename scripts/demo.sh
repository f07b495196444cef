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
echo "== ftvm run --kernel target/guests/compute.elf =="
./target/release/ftvm run --kernel target/guests/compute.elf
echo "== exit status $? =="
