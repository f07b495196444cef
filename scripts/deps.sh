#!/usr/bin/env bash
# Installs the Debian packages ftvm's demo and tests use, if they are missing:
#   qemu-system-x86  QEMU microvm, the side-by-side peer for guest images and benchmarks
#   binutils         as/ld (used by some tests and tools)
# Run as root (apt-get). Idempotent.
set -euo pipefail
want=()
command -v qemu-system-x86_64 >/dev/null || want+=(qemu-system-x86)
command -v ld >/dev/null || want+=(binutils)
if [ ${#want[@]} -gt 0 ]; then
  echo "installing: ${want[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${want[@]}" >/dev/null
fi
if [ ! -e /dev/kvm ]; then
  echo "warning: /dev/kvm is missing; ftvm needs KVM (load kvm_intel, kvm_amd or kvm_pvm)" >&2
fi
