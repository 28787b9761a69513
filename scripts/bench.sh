#!/usr/bin/env bash
# Runs the benchmark of issue 6 (see docs/BENCHMARKS.md): builds the release binaries, then
# `target/release/bench all "$@"`. It needs the local PostgreSQL (127.0.0.1:5432, user
# postgres, trust auth) and RabbitMQ (127.0.0.1:5672, guest/guest), started if they are down.
#
# Usage: scripts/bench.sh [bench options]     e.g. --events 50000 --duration 30s --json
#        scripts/bench.sh --seed-purchases 1000000
# SKIP_BUILD=1 skips the build. The bench makes its own database (bench_<time>_<hex>, dropped
# at the end unless --keep) and AMQP prefix (bench.<tag>), so it never touches stripe.events.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/services.sh
if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
    echo "[bench] building (cargo build --release -p bench -p ingest -p processor)" >&2
    cargo build --release -p bench -p ingest -p processor
fi
exec target/release/bench all "$@"
