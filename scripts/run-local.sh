#!/usr/bin/env bash
# Runs the whole pipeline without Docker, against the machine's own PostgreSQL
# (127.0.0.1:5432, user postgres, trust auth) and RabbitMQ (127.0.0.1:5672, guest/guest).
#
# Usage: scripts/run-local.sh
#
# 1. starts PostgreSQL and RabbitMQ if they are down;
# 2. creates the database `purchases` if it is missing;
# 3. builds both binaries (cargo build --release -p ingest -p processor; SKIP_BUILD=1 skips it);
# 4. applies the migrations and loads the sample catalog (scripts/seed-sample-catalog.sql);
# 5. starts `processor run`, waits for its work queue, starts `ingest`, waits for /readyz.
#
# Ctrl-C (or either binary exiting) sends SIGTERM to both and waits for them to stop.
# Any other setting of the binaries (RUST_LOG, LOG_FORMAT, AMQP_PREFIX, PROCESSOR_*, INGEST_*,
# more STRIPE_WEBHOOK_SECRET_*) is passed through from the environment; see docs/CONFIGURATION.md.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

PG_ADMIN=(psql -h 127.0.0.1 -p 5432 -U postgres -d postgres -v ON_ERROR_STOP=1 -qtA)
DB_NAME=purchases
export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/$DB_NAME}"
export AMQP_URL="${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
export STRIPE_WEBHOOK_SECRET_BOOKING="${STRIPE_WEBHOOK_SECRET_BOOKING:-whsec_test_secret}"
ingest_addr="${INGEST_ADDR:-0.0.0.0:8080}"
ingest_port="${ingest_addr##*:}"
# /readyz, /healthz and /metrics are on ingest's internal listener, apart from the webhooks.
ingest_metrics_addr="${INGEST_METRICS_ADDR:-127.0.0.1:9091}"
ingest_metrics_port="${ingest_metrics_addr##*:}"
work_queue="${AMQP_PREFIX:-stripe.events}.processor"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'run-local: %s\n' "$*" >&2; exit 1; }

# --- services -----------------------------------------------------------------------------

if pg_isready -h 127.0.0.1 -p 5432 -q; then
    say "PostgreSQL is up"
else
    # shellcheck disable=SC2012 # version directory names are plain numbers
    pg_version="$(ls /etc/postgresql | sort -V | tail -n 1)"
    [[ -n "$pg_version" ]] || die "no PostgreSQL cluster under /etc/postgresql"
    say "starting PostgreSQL $pg_version"
    pg_ctlcluster --skip-systemctl-redirect "$pg_version" main start
    for _ in $(seq 1 30); do
        pg_isready -h 127.0.0.1 -p 5432 -q && break
        sleep 1
    done
    pg_isready -h 127.0.0.1 -p 5432 -q || die "PostgreSQL did not come up on 127.0.0.1:5432"
fi

if rabbitmq-diagnostics -q ping >/dev/null 2>&1; then
    say "RabbitMQ is up"
else
    say "starting RabbitMQ"
    rabbitmq-server -detached
    rabbitmqctl --timeout 120 await_startup >/dev/null || die "RabbitMQ did not start"
fi

if [[ "$("${PG_ADMIN[@]}" -c "SELECT 1 FROM pg_database WHERE datname = '$DB_NAME'")" != 1 ]]; then
    say "creating database $DB_NAME"
    "${PG_ADMIN[@]}" -c "CREATE DATABASE $DB_NAME"
fi

# --- build, migrate, seed -------------------------------------------------------------------

if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
    say "building (cargo build --release -p ingest -p processor)"
    cargo build --release -p ingest -p processor
fi
[[ -x target/release/processor && -x target/release/ingest ]] \
    || die "target/release/{processor,ingest} missing: build first"

say "applying migrations"
target/release/processor migrate

say "loading the sample catalog"
psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -q -f scripts/seed-sample-catalog.sql

# --- run ------------------------------------------------------------------------------------

pids=()
# shellcheck disable=SC2317 # called by the traps below
cleanup() {
    trap - EXIT INT TERM
    if ((${#pids[@]} > 0)); then
        say "stopping (SIGTERM to ${pids[*]})"
        kill -TERM "${pids[@]}" 2>/dev/null || true
        wait "${pids[@]}" 2>/dev/null || true
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

alive() { kill -0 "$1" 2>/dev/null; }
# Prefixes a binary's log lines. Ignores Ctrl-C so that it outlives the binary's shutdown logs.
prefix() { trap '' INT; exec sed -u "s/^/[$1] /"; }

say "starting processor"
target/release/processor run > >(prefix processor) 2>&1 &
processor_pid=$!
pids+=("$processor_pid")

# Until the processor has declared the work queue, ingest answers 503 (unroutable).
for _ in $(seq 1 60); do
    alive "$processor_pid" || die "processor exited; see its log above"
    if rabbitmqctl -q list_queues --no-table-headers name 2>/dev/null | grep -qxF "$work_queue"; then
        break
    fi
    sleep 1
done
rabbitmqctl -q list_queues --no-table-headers name 2>/dev/null | grep -qxF "$work_queue" \
    || say "warning: queue $work_queue not declared yet; ingest answers 503 until it is"

say "starting ingest"
target/release/ingest > >(prefix ingest) 2>&1 &
ingest_pid=$!
pids+=("$ingest_pid")

ready=""
for _ in $(seq 1 60); do
    alive "$ingest_pid" || die "ingest exited; see its log above"
    if curl -fsS "http://127.0.0.1:$ingest_metrics_port/readyz" >/dev/null 2>&1; then
        ready=1
        break
    fi
    sleep 1
done
[[ -n "$ready" ]] || die "ingest is not ready after 60 s (http://127.0.0.1:$ingest_metrics_port/readyz)"

cat >&2 <<EOF

Ready: ingest on http://127.0.0.1:$ingest_port (pid $ingest_pid; probes and metrics on
http://127.0.0.1:$ingest_metrics_port), processor (pid $processor_pid).
The sample catalog is loaded.

Send the sample paid checkout (signed with \$STRIPE_WEBHOOK_SECRET, default whsec_test_secret,
which must equal STRIPE_WEBHOOK_SECRET_BOOKING):
  scripts/send-event.sh fixtures/stripe/events/checkout.session.completed.json \\
      http://127.0.0.1:$ingest_port/webhooks/stripe/booking

See the purchase and the event log:
  psql '$DATABASE_URL' -c 'select * from purchases'
  psql '$DATABASE_URL' -c 'select id, type, status, attempts, last_error from stripe_events'

Ctrl-C stops both.
EOF

# Return as soon as either binary exits; the EXIT trap stops the other one.
status=0
wait -n "${pids[@]}" || status=$?
say "a binary exited (status $status)"
exit "$status"
