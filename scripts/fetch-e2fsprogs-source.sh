#!/usr/bin/env bash
# Cache e2fsprogs' source release (its tests/*/image.gz are the regression images the ext4
# reader test reads, crates/diskkit-ext4/tests/e2fsprogs_images.rs) in target/test-cache/.
# The tarball comes from Debian's bookworm source package through apt, so it needs only the
# package registry; nothing fetched is committed.
set -euo pipefail
cd "$(dirname "$0")/.."
want=e2fsprogs_1.47.0.orig.tar.gz
sha256=6667afde56eef0c6af26684974400e4d2288ea49e9441bf5e6229195d51a3578
cache=target/test-cache
mkdir -p "$cache"
if [ -f "$cache/$want" ] && echo "$sha256  $cache/$want" | sha256sum -c --quiet 2>/dev/null; then
    exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cat > "$work/debian.sources" <<'SRC'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
mkdir -p "$work/lists/partial"
apt_opts=(-o "Dir::Etc::SourceList=$work/debian.sources" -o Dir::Etc::SourceParts=/dev/null
          -o "Dir::State::Lists=$work/lists" -o APT::Sandbox::User=root)
apt-get "${apt_opts[@]}" -qq update
(cd "$work" && apt-get "${apt_opts[@]}" -qq source --download-only e2fsprogs)
echo "$sha256  $work/$want" | sha256sum -c --quiet
mv "$work/$want" "$cache/$want"
echo "cached $cache/$want"
