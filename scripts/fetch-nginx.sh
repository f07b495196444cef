#!/usr/bin/env bash
# Builds nginx (Debian bookworm's source package, upstream 1.22.1) as a static, non-PIE
# x86-64 musl executable into target/test-assets/nginx: a second unmodified server for the
# Linux personality (guests/linux), after Redis. `cargo xtask guests` puts it in
# target/guests/nginx.cpio with a configuration and pages to serve. Not committed: it is
# nginx's code and a build output.
#
#   - apt-get source --download-only nginx   (nginx_1.22.1.orig.tar.gz, ~1 MB)
#   - ./configure --with-cc=musl-gcc --with-ld-opt=-static, without the modules that need
#     PCRE or zlib (rewrite, gzip: no musl builds of those libraries here); make
#
# Debian's musl declares crypt(3) but its libc.a has none; nginx's source is left as it
# is and the link gets a crypt() that fails (only auth_basic's password check uses it).
# Needs musl-tools and dpkg-dev (scripts/deps.sh). Idempotent. Any failure stops with the
# reason.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="$root/target/test-assets"
out="$dest/nginx"
[ -s "$out" ] && { echo "nginx present: $out"; exit 0; }

fail() { echo "fetch-nginx.sh: $*" >&2; exit 1; }
command -v musl-gcc >/dev/null || fail "musl-gcc not found: install musl-tools (scripts/deps.sh)"

# shellcheck source=lib/debian-source.sh
. "$root/scripts/lib/debian-source.sh"

mkdir -p "$dest"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
tarball="$(download_source nginx "$work")"
src="$work/src"
mkdir -p "$src" "$work/shim"
tar -xzf "$tarball" -C "$src" --strip-components=1 || fail "could not unpack $tarball"
# The shim: an empty crypt.h (musl's unistd.h declares crypt) and a crypt() that fails.
echo '#include <unistd.h>' > "$work/shim/crypt.h"
cat > "$work/shim/crypt.c" <<'C'
#include <errno.h>
#include <stddef.h>
char *crypt(const char *key, const char *salt) { (void)key; (void)salt; errno = ENOSYS; return NULL; }
C
musl-gcc -O2 -c "$work/shim/crypt.c" -o "$work/shim/crypt.o" || fail "could not build the crypt shim"
echo "building $(basename "$tarball") with musl-gcc (a minute or so)"
if ! (cd "$src" && ./configure --with-cc=musl-gcc --with-cc-opt="-I$work/shim" \
        --with-ld-opt="-static $work/shim/crypt.o" --without-http_rewrite_module \
        --without-http_gzip_module --without-pcre && make -j2) >"$work/build.log" 2>&1; then
  tail -n 40 "$work/build.log" >&2
  fail "the nginx build failed"
fi
bin="$src/objs/nginx"
[ -s "$bin" ] || fail "the build made no $bin"
if command -v readelf >/dev/null; then
  readelf -lW "$bin" | grep -q INTERP && fail "$bin is dynamically linked (PT_INTERP)"
fi
cp "$bin" "$out.tmp"
mv "$out.tmp" "$out"
basename "$tarball" > "$dest/nginx.package"
echo "nginx: $out ($(stat -c %s "$out") bytes)"
