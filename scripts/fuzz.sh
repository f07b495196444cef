#!/usr/bin/env bash
# Runs each cargo-fuzz target for a bounded time (docs/fuzzing.md), one at a time, on one
# core, niced: scripts/fuzz.sh [SECONDS] [TARGET...]   (default: 60 s each, every target).
# Not part of CI. Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz --locked`).
# The corpus grows under fuzz/corpus/TARGET (only the committed seed-* files are tracked);
# a crash, leak, timeout or over-limit allocation lands in fuzz/artifacts/TARGET and stops
# the run with a non-zero status.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(log_reader api_http replication_channel snapshot_manifest virtio_queues)
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: cargo-fuzz is missing: cargo install cargo-fuzz --locked" >&2
    exit 2
fi
nice cargo +nightly fuzz build -O
declare -A max_len=([virtio_queues]=16384 [replication_channel]=16384)
status=0
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t"
    echo "== $t: ${seconds} s"
    log="fuzz/artifacts-$t.log"
    # -malloc_limit_mb: one allocation over 256 MiB is a finding (no input may ask for one).
    set +e
    nice cargo +nightly fuzz run -O "$t" "fuzz/corpus/$t" -- \
        -max_total_time="$seconds" -max_len="${max_len[$t]:-8192}" -timeout=10 \
        -rss_limit_mb=2048 -malloc_limit_mb=256 -print_final_stats=1 >"$log" 2>&1
    rc=$?
    set -e
    grep -E '^(#[0-9]+[[:space:]]+(INITED|DONE)|==[0-9]+==|SUMMARY|stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb|new_units_added)|Done|Test unit written|.*panicked)' "$log" || true
    if [ $rc -ne 0 ]; then
        echo "== $t: FOUND something or failed (status $rc; input in fuzz/artifacts/$t/, output in $log)" >&2
        status=1
    fi
done
exit $status
