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

# cargo-deny reads a database from a git checkout under its db-path, in a directory named
# after the URL; a local one is given as a file:// URL, and --disable-fetch keeps it as is.
db_root="$tmp/dbs"
mkdir -p "$db_root"
if fetch_fresh; then
    echo "check-deps: advisories from a fresh clone of $upstream ($(git -C "$tmp/fresh" log -1 --format=%cs))"
    db_url="$upstream"
    deny_args=()
else
    snapshot_date="$(sed -n 's/^snapshot: [0-9a-f]* //p' "$snapshot/README.md")"
    echo "check-deps: $upstream unreachable; advisories from the snapshot of $snapshot_date in .ci/advisory-db"
    # A git repository of the snapshot, as cargo-deny expects one.
    mkdir -p "$tmp/snapshot"
    cp -a "$snapshot/crates" "$tmp/snapshot/"
    git -C "$tmp/snapshot" init -q
    git -C "$tmp/snapshot" add -A
    GIT_AUTHOR_DATE="$snapshot_date" GIT_COMMITTER_DATE="$snapshot_date" \
        git -C "$tmp/snapshot" -c user.name=ci -c user.email=ci@localhost commit -qm snapshot
    db_url="file://$tmp/snapshot"
    deny_args=()
fi

printf '[advisories]\ndb-path = "%s"\ndb-urls = ["%s"]\n' "$db_root" "$db_url" > "$tmp/db.toml"
python3 - "$root/deny.toml" "$tmp/db.toml" "$tmp/deny.toml" <<'PY'
import sys
base, extra, out = sys.argv[1:]
text = open(base, encoding="utf-8").read()
lines = open(extra, encoding="utf-8").read().splitlines()[1:]
# The database location goes into deny.toml's own [advisories] table.
text = text.replace("[advisories]\n", "[advisories]\n" + "\n".join(lines) + "\n", 1)
open(out, "w", encoding="utf-8").write(text)
PY

cargo deny --locked check --config "$tmp/deny.toml" ${deny_args[@]+"${deny_args[@]}"} \
    advisories bans licenses sources
cargo machete
echo "check-deps: cargo deny and cargo machete OK"
