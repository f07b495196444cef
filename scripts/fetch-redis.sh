#!/usr/bin/env bash
# Builds the real Redis server (Debian bookworm's source package, upstream 7.0.15) as a
# static, non-PIE x86-64 musl executable into target/test-assets/redis-server, for the Linux
# personality's guest image (guests/linux, `cargo xtask guests` -> target/guests/redis.cpio)
# and its tests. Not committed: it is Redis's code and a build output.
#
#   - adds a deb-src line for bookworm main (the archive this machine already uses) if none
#   - apt-get source --download-only redis   (redis_7.0.15.orig.tar.gz, ~3 MB)
#   - unpacks the upstream tarball into target/redis-src
#   - make CC=musl-gcc MALLOC=libc USE_SYSTEMD=no BUILD_TLS=no LDFLAGS=-static
#
# Needs musl-tools and dpkg-dev (scripts/deps.sh installs them). Idempotent: does nothing
# when the binary is already there. Any failure stops with the reason.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="$root/target/test-assets"
out="$dest/redis-server"
src="$root/target/redis-src"
want_version="7.0.15"
[ -s "$out" ] && { echo "redis-server present: $out"; exit 0; }

fail() { echo "fetch-redis.sh: $*" >&2; exit 1; }

command -v musl-gcc >/dev/null || fail "musl-gcc not found: install musl-tools (scripts/deps.sh)"
command -v dpkg-source >/dev/null || fail "dpkg-source not found: install dpkg-dev (scripts/deps.sh)"

# shellcheck source=lib/debian-source.sh
. "$root/scripts/lib/debian-source.sh"

mkdir -p "$dest"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
tarball="$(download_source redis "$work")"
case "$tarball" in
  *"redis_$want_version.orig.tar.gz") ;;
  *) echo "fetch-redis.sh: warning: expected Redis $want_version, got $(basename "$tarball")" >&2 ;;
esac

rm -rf "$src"
mkdir -p "$src"
tar -xzf "$tarball" -C "$src" --strip-components=1 || fail "could not unpack $tarball"
echo "building $(basename "$tarball") with musl-gcc in $src (a minute or so)"
# GIT_CEILING_DIRECTORIES: Redis's mkreleasehdr.sh asks git for a commit id; without the
# ceiling it would find ftvm's own repository above target/ and report its commit.
if ! GIT_CEILING_DIRECTORIES="$root/target" make -C "$src" -j2 CC=musl-gcc MALLOC=libc USE_SYSTEMD=no BUILD_TLS=no LDFLAGS=-static \
     redis-server >"$src/ftvm-build.log" 2>&1; then
  tail -n 40 "$src/ftvm-build.log" >&2
  fail "the Redis build failed (full log: $src/ftvm-build.log)"
fi
bin="$src/src/redis-server"
[ -s "$bin" ] || fail "the build made no $bin"
# A static, non-PIE x86-64 executable: the Linux personality loads exactly that (or static-PIE).
info="$(file -b "$bin" 2>/dev/null || true)"
if command -v readelf >/dev/null; then
  readelf -lW "$bin" | grep -q INTERP && fail "$bin is dynamically linked (PT_INTERP)"
  readelf -hW "$bin" | grep -q 'Advanced Micro Devices X86-64' || fail "$bin is not x86-64"
fi
cp "$bin" "$out.tmp"
mv "$out.tmp" "$out"
basename "$tarball" > "$dest/redis-server.package"
echo "redis-server: $out ($(stat -c %s "$out") bytes; $info)"
