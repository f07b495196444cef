#!/usr/bin/env bash
# Fetches the kernel of Debian's linux-image-cloud-amd64 (a real bzImage) into
# target/test-assets/vmlinuz-cloud for the bzImage boot tests. Not committed: it is large and
# Debian's. Idempotent: does nothing when the file is already there.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="$root/target/test-assets"
out="$dest/vmlinuz-cloud"
[ -s "$out" ] && { echo "test kernel present: $out"; exit 0; }
mkdir -p "$dest"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
pkg="$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/{print $2; exit}')"
if [ -z "$pkg" ]; then
  apt-get update -qq
  pkg="$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/{print $2; exit}')"
fi
echo "fetching $pkg"
(cd "$work" && apt-get download "$pkg" >/dev/null)
dpkg-deb -x "$work"/*.deb "$work/x"
cp "$work"/x/boot/vmlinuz-* "$out"
echo "$pkg" > "$dest/vmlinuz-cloud.package"
echo "test kernel: $out ($(stat -c %s "$out") bytes, $pkg)"
