#!/usr/bin/env bash
# Installs the Debian packages ftvm's demo and tests use, if they are missing:
#   qemu-system-x86  QEMU microvm, the side-by-side peer for guest images and benchmarks
#   binutils         as/ld (used by some tests and tools)
#   redis-tools      redis-cli and redis-benchmark, the real clients of the kvstore guest
#   iproute2         ip netns, bridges, veths and TAPs for the test network
#   etcd-server      etcd, the lease arbiter of the pair tests (etcd://HOST:PORT/KEY)
#   musl-tools       musl-gcc: scripts/fetch-redis.sh builds the real Redis as a static binary
#   dpkg-dev         dpkg-source: apt-get source (fetch-redis.sh) unpacks Debian's redis source
#   tcl              tclsh: Redis's own test suite (scripts/redis-suite.sh) against the guest
#   curl             the real HTTP client of the nginx and Go tests (scripts/fetch-nginx.sh builds nginx)
#   golang-go        go: a test builds a Go HTTP server for the Linux personality
# Run as root (apt-get). Idempotent.
set -euo pipefail
want=()
command -v qemu-system-x86_64 >/dev/null || want+=(qemu-system-x86)
command -v ld >/dev/null || want+=(binutils)
command -v redis-benchmark >/dev/null || want+=(redis-tools)
command -v ip >/dev/null || want+=(iproute2)
command -v etcd >/dev/null || want+=(etcd-server)
command -v python3 >/dev/null || want+=(python3)
command -v musl-gcc >/dev/null || want+=(musl-tools)
command -v dpkg-source >/dev/null || want+=(dpkg-dev)
command -v tclsh >/dev/null || want+=(tcl)
command -v curl >/dev/null || want+=(curl)
command -v go >/dev/null || want+=(golang-go)
if [ ${#want[@]} -gt 0 ]; then
  echo "installing: ${want[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${want[@]}" >/dev/null
fi
if [ ! -e /dev/kvm ]; then
  echo "warning: /dev/kvm is missing; ftvm needs KVM (load kvm_intel, kvm_amd or kvm_pvm)" >&2
fi
