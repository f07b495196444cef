# Shared by scripts/fetch-redis.sh and scripts/fetch-nginx.sh (sourced, not run): fetching a
# Debian bookworm source package's upstream tarball with apt-get source. Both scripts
# define fail() before sourcing this.

# A deb-src entry for bookworm main (the archive this machine already uses), once.
ensure_deb_src() {
  if grep -rqs '^\(Types:.*deb-src\|deb-src \)' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    return 0
  fi
  [ "$(id -u)" = 0 ] || fail "no deb-src entry in /etc/apt and not root to add one"
  cat > /etc/apt/sources.list.d/ftvm-deb-src.sources <<'SOURCES'
# Added by ftvm's scripts/lib/debian-source.sh: Debian source packages (apt-get source).
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
  echo "added /etc/apt/sources.list.d/ftvm-deb-src.sources"
  apt-get update -qq || fail "apt-get update failed after adding the deb-src entry"
}

# download_source PACKAGE DIR: the package's PACKAGE_*.orig.tar.gz in DIR (its path on
# standard output); one apt-get update and a second try if the first fails.
download_source() {
  local package="$1" dir="$2" tarball
  ensure_deb_src >&2
  if ! (cd "$dir" && apt-get source --download-only "$package" >"$dir/apt.log" 2>&1); then
    apt-get update -qq >&2 || true
    (cd "$dir" && apt-get source --download-only "$package" >"$dir/apt.log" 2>&1) ||
      { cat "$dir/apt.log" >&2; fail "apt-get source --download-only $package failed (see above)"; }
  fi
  tarball="$(ls "$dir/${package}"_*.orig.tar.gz 2>/dev/null | head -n1)"
  [ -n "$tarball" ] || fail "apt-get source fetched no ${package}_*.orig.tar.gz: $(ls "$dir")"
  echo "$tarball"
}
