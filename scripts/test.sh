#!/usr/bin/env bash
# Runs every test against a real local PostgreSQL and RabbitMQ, starting them if they are
# down. Each test creates its own database (#[sqlx::test]) and its own exchange/queue names.
set -euo pipefail
cd "$(dirname "$0")/.."

export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
export AMQP_URL="${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"

scripts/services.sh
cargo test --workspace --all-targets "$@"
