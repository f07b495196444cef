#!/usr/bin/env bash
# The test suite: installs what the tests need, builds the guests, fetches the Linux test
# kernel, builds the real Redis and nginx (static, musl) for the Linux personality and
# fetches Debian's own (glibc) redis-server package, checks formatting and lints, and runs
# every test. CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
scripts/fetch-test-kernel.sh
scripts/fetch-redis.sh
scripts/fetch-nginx.sh
scripts/fetch-debian-redis.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo xtask guests
cargo test --workspace
