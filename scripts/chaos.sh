#!/usr/bin/env bash
# Builds the release binaries and runs the chaos suite (docs/RELIABILITY.md).
#
#   scripts/chaos.sh            long form: 20,000 events over 5 minutes (about 6 minutes in all)
#   scripts/chaos.sh --short    short form for CI: 1,500 events over 1 minute (about 1.5 minutes)
#   scripts/chaos.sh --short --seed 42     any other argument goes to the chaos binary
#
# Needs the machine's PostgreSQL on 127.0.0.1:5432 (trust auth; CHAOS_POSTGRES_URL to change)
# and RabbitMQ's packaged scripts (rabbitmq-server installed; the default broker may run or
# not, it is left alone). SKIP_BUILD=1 skips the build. Logs of a failed run are copied to
# target/chaos-logs/.
set -euo pipefail
cd "$(dirname "$0")/.."

form=(--events 20000 --minutes 5)
args=()
for arg in "$@"; do
  case "$arg" in
    --short) form=(--events 1500 --minutes 1) ;;
    *) args+=("$arg") ;;
  esac
done

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
# PostgreSQL and RabbitMQ's packaged scripts, as the tests use them. Only when something is
# missing does scripts/services.sh install or start them (the machine's default broker
# included); the suite itself never touches the default broker.
if ! command -v pg_ctlcluster >/dev/null 2>&1 || ! command -v rabbitmq-server >/dev/null 2>&1 \
  || ! port_open 5432; then
  scripts/services.sh
fi

if [ -z "${SKIP_BUILD:-}" ]; then
  cargo build --release -p chaos -p ingest -p processor
fi

target_dir="${CARGO_TARGET_DIR:-target}"
mkdir -p "$target_dir/chaos-logs"
exec "$target_dir/release/chaos" "${form[@]}" \
  --bin-dir "$target_dir/release" \
  --logs-out "$target_dir/chaos-logs" \
  ${args[@]+"${args[@]}"}
