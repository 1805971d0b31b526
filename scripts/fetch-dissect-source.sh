#!/usr/bin/env bash
# Cache dissect.hypervisor 3.20's source release from PyPI in target/test-cache/: its
# tests/_data/disk/asif/basic.asif.gz is an ASIF image made by macOS, which
# crates/diskkit-cli/tests/asif_macos.rs reads and compares with diskkit's own ASIF output.
# Nothing fetched is committed.
set -euo pipefail
cd "$(dirname "$0")/.."
want=dissect_hypervisor-3.20.tar.gz
sha256=90f4d46a6d6b81045c6fc123600bb8c12afa58c464ecaa67d5ca9435fcff7957
url=https://files.pythonhosted.org/packages/ab/ab/f81f09e6a2723b352ba28f655ceed6045ce15bdb3c338595d680928aac42/$want
cache=target/test-cache
mkdir -p "$cache"
if [ -f "$cache/$want" ] && echo "$sha256  $cache/$want" | sha256sum -c --quiet 2>/dev/null; then
    exit 0
fi
tmp=$(mktemp "$cache/.$want.XXXXXX")
trap 'rm -f "$tmp"' EXIT
curl -sSfL --retry 3 -o "$tmp" "$url"
echo "$sha256  $tmp" | sha256sum -c --quiet
chmod 644 "$tmp"
mv "$tmp" "$cache/$want"
echo "cached $cache/$want"
