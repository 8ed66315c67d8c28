#!/usr/bin/env bash
# Prepare the patched mistralrs-core 0.8.1 that the workspace's [patch.crates-io] points at:
# unpack the exact crates.io release from the cargo cache (fetching it first if needed), check
# its sha256, apply every patches/*.patch in order. Idempotent: skips work when the result is
# already there for the same patch series.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
name=mistralrs-core-0.8.1
sha=a2b8b9e5c94491d9ceeded3a30291cb6af6ae74810a5776dd55e3bbb8b3429d4
# The upstream commit of the release (.cargo_vcs_info.json): a stub .git/HEAD with it keeps the
# crate's build script (which watches .git/HEAD) from re-running on every build.
upstream_commit=9397956728e6508d1c7a288043161ad1d70b658f
dest="$root/target/patched/$name"
series_hash=$(cat "$root"/patches/*.patch | sha256sum | cut -d' ' -f1)

if [ -f "$dest/.palu-series" ] && [ "$(cat "$dest/.palu-series")" = "$series_hash" ]; then
    exit 0
fi

cargo_home=${CARGO_HOME:-$HOME/.cargo}
find_crate() { ls "$cargo_home"/registry/cache/*/"$name.crate" 2>/dev/null | head -n1 || true; }
crate=$(find_crate)
if [ -z "$crate" ]; then
    echo "fetching $name from crates.io" >&2
    cargo fetch --manifest-path "$root/patches/fetch/Cargo.toml" >&2
    crate=$(find_crate)
fi
[ -n "$crate" ] || { echo "error: $name.crate not in the cargo cache and could not be fetched" >&2; exit 1; }
got=$(sha256sum "$crate" | cut -d' ' -f1)
if [ "$got" != "$sha" ]; then
    echo "error: $crate has sha256 $got, expected $sha (not the crates.io release the patches are for)" >&2
    exit 1
fi

rm -rf "$dest" && mkdir -p "$(dirname "$dest")"
tar xzf "$crate" -C "$(dirname "$dest")"
for p in "$root"/patches/*.patch; do
    patch --quiet --forward -p1 -d "$dest" < "$p" || { echo "error: $p does not apply to $name" >&2; exit 1; }
done
mkdir -p "$dest/.git" && echo "$upstream_commit" > "$dest/.git/HEAD"
echo "$series_hash" > "$dest/.palu-series"
echo "patched $name ($(ls "$root"/patches/*.patch | wc -l) patch(es)) -> $dest" >&2
