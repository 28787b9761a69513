#!/usr/bin/env bash
# Checks the dependency tree. Run by .ci/run.
#
# Usage: scripts/check-deps.sh
#
# 1. `cargo deny check` with deny.toml: advisories (known vulnerabilities, unmaintained and
#    yanked crates), licenses, bans (duplicates reported, banned crates refused), sources.
#    The advisory database is RustSec's: fetched fresh when its repository is reachable, else
#    the snapshot in .ci/advisory-db (its README says from when; refresh it with
#    `scripts/check-deps.sh --refresh-snapshot` on a machine that reaches it).
# 2. `cargo machete`: dependencies a crate declares and never uses.
#
# Needs cargo-deny and cargo-machete (`cargo install --locked cargo-deny cargo-machete`;
# .ci/run installs them when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"

die() { printf 'check-deps: %s\n' "$*" >&2; exit 1; }
for tool in cargo-deny cargo-machete; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool missing (cargo install --locked $tool)"
done

upstream="https://github.com/rustsec/advisory-db"
snapshot="$root/.ci/advisory-db"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

fetch_fresh() {
    timeout 60 git clone -q --depth 1 "$upstream" "$tmp/fresh" >/dev/null 2>&1
}

if [[ "${1:-}" == --refresh-snapshot ]]; then
    fetch_fresh || die "cannot clone $upstream"
    rm -rf "$snapshot/crates"
    cp -a "$tmp/fresh/crates" "$snapshot/"
    commit="$(git -C "$tmp/fresh" log -1 --format='%H %cs')"
    sed -i "s/^snapshot: .*/snapshot: $commit/" "$snapshot/README.md"
    echo "check-deps: snapshot refreshed to $commit"
    exit 0
fi

config=(--config "$root/deny.toml")
if timeout 20 git ls-remote "$upstream" HEAD >/dev/null 2>&1; then
    echo "check-deps: advisories from $upstream (fetched by cargo-deny)"
else
    snapshot_date="$(sed -n 's/^snapshot: [0-9a-f]* //p' "$snapshot/README.md")"
    echo "check-deps: $upstream unreachable; advisories from the snapshot of $snapshot_date in .ci/advisory-db"
    # cargo-deny keeps each database as a git checkout in <db-path>/<name>-<hash of the URL>
    # (this is the directory of RustSec's URL) and, with --offline, reads it as it is. The
    # snapshot's commit carries its date, which cargo-deny reads as the database's age.
    db="$tmp/dbs/advisory-db-3157b0e258782691"
    mkdir -p "$db"
    cp -a "$snapshot/crates" "$db/"
    git -C "$db" init -q
    git -C "$db" add -A
    GIT_AUTHOR_DATE="$snapshot_date 12:00:00 +0000" GIT_COMMITTER_DATE="$snapshot_date 12:00:00 +0000" \
        git -C "$db" -c user.name=ci -c user.email=ci@localhost commit -qm "RustSec snapshot"
    # deny.toml with the database's location added to its [advisories] table.
    sed "s|^\[advisories\]\$|[advisories]\ndb-path = \"$tmp/dbs\"\ndb-urls = [\"$upstream\"]|" \
        "$root/deny.toml" > "$tmp/deny.toml"
    config=(--offline --config "$tmp/deny.toml")
fi

# cargo-deny reads the whole graph (`cargo metadata`), every platform's crates included,
# and offline it cannot download the ones a build for this platform never needed.
cargo fetch --locked || die "cannot fetch the crates of Cargo.lock (is the registry reachable?)"
cargo deny --locked "${config[@]}" check --hide-inclusion-graph advisories bans licenses sources
cargo machete
echo "check-deps: cargo deny and cargo machete OK"
