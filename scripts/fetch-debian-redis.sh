#!/usr/bin/env bash
# Fetches Debian's own redis-server package (dynamically linked against glibc, PIE) and
# unpacks it into target/test-assets/debian-redis, with redis-tools' redis-check-rdb (the
# server's binary: Debian's /usr/bin/redis-server is a link to it), for the Linux personality's stretch
# (issue 15): `cargo xtask guests` then builds target/guests/redis-glibc.cpio from it, its
# interpreter and the host's copies of the libraries `ldd` names. Not committed: Debian's
# binary. Idempotent; any failure stops with the reason (the normal build never needs this).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="$root/target/test-assets/debian-redis"
[ -x "$out/usr/bin/redis-server" ] && { echo "Debian's redis-server present: $out"; exit 0; }
fail() { echo "fetch-debian-redis.sh: $*" >&2; exit 1; }
command -v apt-get >/dev/null || fail "apt-get not found (a Debian host is needed)"
command -v dpkg-deb >/dev/null || fail "dpkg-deb not found"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
chmod 755 "$tmp"   # apt's _apt user writes the download there
(cd "$tmp" && apt-get download redis-server redis-tools) || fail "apt-get download redis-server redis-tools failed"
mkdir -p "$out"
dpkg-deb -x "$tmp"/redis-server_*.deb "$out"
dpkg-deb -x "$tmp"/redis-tools_*.deb "$out"
[ -x "$out/usr/bin/redis-server" ] || fail "no usr/bin/redis-server in the package"
echo "Debian's redis-server: $out/usr/bin/redis-server"
