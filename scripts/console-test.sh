#!/usr/bin/env bash
# Browser tests of the ops console (issue 14): headless Chromium driven by playwright-core,
# against a real ingest, processor, RabbitMQ and PostgreSQL.
#
# 1. builds ingest and processor; makes a fresh database and a unique AMQP prefix;
# 2. starts ingest, and `processor run` with OPS_TOKEN and OPS_READONLY_TOKEN (so it also
#    serves the console), each on a free port;
# 3. sends two signed checkout.session.completed while the catalog is empty: the processor
#    dead-letters them (permanent: unknown catalog rows); then seeds the catalog, so that
#    the first one's replay succeeds (the second names content that never exists);
# 4. runs console-tests/console.test.mjs: log in, overview, filter, see why it failed,
#    replay with its dry-run count, the purchase on the event page, purge the other after
#    its JSON download, the audit; read-only
#    token refused (403), no token (401), a cross-site POST refused (403). Screenshots go
#    to docs/console/*.png;
# 5. stops everything, drops the database and deletes the prefix's queues and exchanges.
#
# Needs: the local services (scripts/services.sh), Node.js >= 20 with npm, and Debian's
# chromium (installed with apt-get when missing). KEEP=1 leaves the database and queues.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

log() { echo "[console-test] $*" >&2; }

scripts/services.sh
if ! command -v chromium >/dev/null; then
    log "installing chromium"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
(cd console-tests && npm ci --no-audit --no-fund --silent)

log "building ingest and processor"
# The binaries' paths from cargo itself (CARGO_TARGET_DIR may point anywhere).
bins="$(cargo build -p ingest -p processor --bins --message-format=json-render-diagnostics \
    | python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        print(m["target"]["name"], m["executable"])')"
ingest_bin="$(awk '$1 == "ingest" {print $2}' <<<"$bins")"
processor_bin="$(awk '$1 == "processor" {print $2}' <<<"$bins")"
work="$(mktemp -d)"
# Private copies: another build may replace the originals while the test runs.
cp "$ingest_bin" "$work/ingest"
cp "$processor_bin" "$work/processor"

tag="$(date +%s)_$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n')"
db="console_test_$tag"
prefix="console.$tag"
export DATABASE_URL="postgres://postgres@127.0.0.1:5432/$db"
export AMQP_URL="${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
export AMQP_PREFIX="$prefix"
export OPS_TOKEN="ops-act-$tag-0123456789"
export OPS_READONLY_TOKEN="ops-look-$tag-0123456789"
secret="whsec_console_test_$tag"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
console_port="$(free_port)"
ingest_port="$(free_port)"
metrics_port="$(free_port)"
ingest_metrics_port="$(free_port)"
foreign_port="$(free_port)"

pids=()
cleanup() {
    local status=$?
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    if [[ "${KEEP:-0}" != 1 ]]; then
        node console-tests/cleanup.mjs "$AMQP_URL" "$prefix" || log "could not delete the queues of $prefix"
        psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null || true
    fi
    if [[ $status != 0 ]]; then
        log "failed; processor log:"; tail -n 40 "$work/processor.log" >&2 || true
        log "ingest log:"; tail -n 20 "$work/ingest.log" >&2 || true
    fi
    rm -rf "$work"
    exit $status
}
trap cleanup EXIT

psql -h 127.0.0.1 -U postgres -qc "CREATE DATABASE \"$db\""
"$work/processor" migrate >/dev/null 2>&1

log "starting processor (console on 127.0.0.1:$console_port) and ingest (127.0.0.1:$ingest_port)"
OPS_CONSOLE_ADDR="127.0.0.1:$console_port" OPS_CONSOLE_INDEX_INTERVAL=1s \
PROCESSOR_METRICS_ADDR="127.0.0.1:$metrics_port" PROCESSOR_RETRY_DELAYS=1s \
    "$work/processor" run >"$work/processor.log" 2>&1 &
pids+=($!)
INGEST_ADDR="127.0.0.1:$ingest_port" INGEST_METRICS_ADDR="127.0.0.1:$ingest_metrics_port" \
    STRIPE_WEBHOOK_SECRET_BOOKING="$secret" \
    "$work/ingest" >"$work/ingest.log" 2>&1 &
pids+=($!)

wait_for() { # wait_for <what> <seconds> <command...>
    local what="$1" seconds="$2"; shift 2
    for _ in $(seq $((seconds * 5))); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.2
    done
    log "timed out waiting for $what"; return 1
}
wait_for "the processor to consume" 60 curl -sf "http://127.0.0.1:$metrics_port/readyz"
# Ingest's probes are on its internal listener, apart from the webhooks.
wait_for "ingest" 60 curl -sf "http://127.0.0.1:$ingest_metrics_port/readyz"

# Two paid sessions while the catalog is empty: permanently failing, dead-lettered at once.
# The first will be replayed once the catalog is seeded; the second names content that
# never exists, and will be purged. A card-like number in the metadata lets the test check
# the masking of the raw body and of the purge download.
event_id="evt_console_$tag"
purge_event_id="evt_console_purge_$tag"
python3 - "$root/fixtures/stripe/events/checkout.session.completed.json" "$work" "$event_id" "$purge_event_id" <<'PY'
import json, sys, uuid
fixture, work, replay_id, purge_id = sys.argv[1:]
for name, event_id, content in (("replay", replay_id, None), ("purge", purge_id, str(uuid.uuid4()))):
    event = json.load(open(fixture))
    event["id"] = event_id
    session = event["data"]["object"]
    session["metadata"]["note"] = "paid with 4242 4242 4242 4242"
    if content:
        session["id"] = "cs_test_purge_" + event_id
        session["payment_intent"] = "pi_purge_" + event_id
        session["metadata"]["contentId"] = content
    json.dump(event, open(f"{work}/{name}.json", "w"))
PY
for name in replay purge; do
    STRIPE_WEBHOOK_SECRET="$secret" scripts/send-event.sh "$work/$name.json" \
        "http://127.0.0.1:$ingest_port/webhooks/stripe/booking" >/dev/null
done
dead() {
    local page
    page="$(curl -sf -H "Authorization: Bearer $OPS_READONLY_TOKEN" \
        "http://127.0.0.1:$console_port/dead-letters?type=checkout.session.completed")"
    grep -q "$event_id" <<<"$page" && grep -q "$purge_event_id" <<<"$page"
}
wait_for "both events in the console's dead letters" 60 dead
log "both events are dead-lettered; seeding the catalog so that the first one's replay succeeds"
psql "$DATABASE_URL" -q -f scripts/seed-sample-catalog.sql >/dev/null

CONSOLE_URL="http://127.0.0.1:$console_port" FOREIGN_PORT="$foreign_port" EVENT_ID="$event_id" \
PURGE_EVENT_ID="$purge_event_id" \
SCREENSHOTS="$root/docs/console" node console-tests/console.test.mjs
log "passed"
