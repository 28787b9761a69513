#!/usr/bin/env bash
# Runs the Compose stack for real: build, start, wait until every service is healthy, send
# a signed paid checkout to the published ingest port, see the purchase in Compose's
# PostgreSQL, scale the processor to 3 and see all three consuming, then `down -v`.
# With --cluster, then the same from scratch with the `cluster` profile (three broker
# nodes): one node is killed, and an event sent afterwards must still become a purchase.
#
# Usage: scripts/compose-smoke.sh [--cluster | --cluster-only]
#
# Needs a running Docker engine and Compose, v2 (`docker compose`) or v1 (`docker-compose`),
# and the images docker-compose.yml names (pulled, or local stand-ins where no registry is
# reachable: see docs/OPERATIONS.md). Run by .ci/run.
#
# Environment:
#   SMOKE_PROJECT     Compose project name (default: purchases-smoke-<pid>), so that the run
#                     collides with no other stack; everything of it is removed on exit
#   SMOKE_KEEP=1      leave the stack running on exit (to look around; `down -v` it yourself)
#   SMOKE_TIMEOUT     seconds to wait for the stack to become healthy (default: 300)
#   DOCKER_BUILDKIT   default 0: the classic builder, which needs no frontend image
# The host ports are free ones picked at start (INGEST_PORT, POSTGRES_PORT, ... as in
# .env.example), so a local stack on the default ports can keep running. The run ignores
# .env and exported settings: it tests the defaults, except for those ports.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"

parts=(basic)
case "${1:-}" in
    "") ;;
    --cluster) parts=(basic cluster) ;;
    --cluster-only) parts=(cluster) ;;
    *) echo "usage: $0 [--cluster | --cluster-only]" >&2; exit 2 ;;
esac

project="${SMOKE_PROJECT:-purchases-smoke-$$}"
timeout_secs="${SMOKE_TIMEOUT:-300}"
export DOCKER_BUILDKIT="${DOCKER_BUILDKIT:-0}"
started=$SECONDS

say() { printf '\n== %s (%ss)\n' "$*" "$((SECONDS - started))"; }
die() { printf 'compose-smoke: %s\n' "$*" >&2; exit 1; }

compose_cmd=()
if docker compose version >/dev/null 2>&1; then
    compose_cmd=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
    compose_cmd=(docker-compose)
else
    die "neither \`docker compose\` nor \`docker-compose\` found"
fi
docker info >/dev/null 2>&1 || die "no Docker engine answers (start dockerd)"

tmp="$(mktemp -d)"
: > "$tmp/empty.env"

# Free host ports, so that nothing already listening (a local ingest on 8080, a developer's
# own stack) is in the way.
read -r ingest_port metrics_port pg_port amqp_port mgmt_port < <(python3 - <<'PY'
import socket
socks = []
for _ in range(5):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
)

profile_args=()
# Compose in a clean environment: the defaults of docker-compose.yml, the ports above, and
# what the engine and Compose themselves need. COMPOSE_FILE passes through, so that an
# override file can be tried with the same script.
compose() {
    env -i PATH="$PATH" HOME="${HOME:-/root}" \
        ${DOCKER_HOST:+DOCKER_HOST="$DOCKER_HOST"} \
        ${COMPOSE_FILE:+COMPOSE_FILE="$COMPOSE_FILE"} \
        DOCKER_BUILDKIT="$DOCKER_BUILDKIT" COMPOSE_DOCKER_CLI_BUILD="$DOCKER_BUILDKIT" \
        INGEST_PORT="$ingest_port" INGEST_METRICS_PORT="$metrics_port" \
        POSTGRES_PORT="$pg_port" RABBITMQ_PORT="$amqp_port" RABBITMQ_MANAGEMENT_PORT="$mgmt_port" \
        "${compose_cmd[@]}" --env-file "$tmp/empty.env" -p "$project" \
        ${profile_args[@]+"${profile_args[@]}"} "$@"
}

cleanup() {
    local status=$?
    if [[ $status != 0 ]]; then
        echo "compose-smoke: FAILED; state and recent logs follow" >&2
        compose ps -a >&2 2>/dev/null || compose ps >&2 || true
        compose logs --no-color --tail=40 >&2 || true
    fi
    if [[ "${SMOKE_KEEP:-0}" == 1 ]]; then
        echo "compose-smoke: left running: ${compose_cmd[*]} -p $project down -v" >&2
    else
        compose --profile cluster down -v --remove-orphans >/dev/null 2>&1 || true
    fi
    rm -rf "$tmp"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Containers of a service of this project, by Compose's labels (the same in v1 and v2, and
# they include exited containers).
containers() {
    docker ps -a -q --filter "label=com.docker.compose.project=$project" \
        --filter "label=com.docker.compose.service=$1"
}

# Waits until every service with a health check is healthy and `migrate` exited 0.
wait_healthy() {
    local services=("$@") deadline=$((SECONDS + timeout_secs)) pending
    while :; do
        pending=()
        for service in "${services[@]}"; do
            local ids
            ids="$(containers "$service")"
            [[ -n "$ids" ]] || { pending+=("$service:absent"); continue; }
            for id in $ids; do
                local state
                if [[ "$service" == migrate ]]; then
                    state="$(docker inspect -f '{{.State.Status}}/{{.State.ExitCode}}' "$id")"
                    [[ "$state" == exited/0 ]] && continue
                    [[ "$state" == exited/* ]] && die "migrate exited with code ${state#exited/}"
                else
                    state="$(docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}' "$id")"
                    [[ "$state" == healthy || "$state" == running && "$service" == rabbitmq-replicas ]] && continue
                fi
                pending+=("$service:$state")
            done
        done
        [[ ${#pending[@]} == 0 ]] && return 0
        (( SECONDS < deadline )) || die "not healthy after ${timeout_secs}s: ${pending[*]}"
        sleep 2
    done
}

psql_query() {
    compose exec -T postgres psql -U postgres -d purchases -v ON_ERROR_STOP=1 "$@"
}

# The sample paid checkout with a fresh event id and creation time (and, given a suffix, its
# own checkout session and payment intent, so that it is a new payment), signed with the
# sample secret and posted to the published ingest port. Retries on 503, as Stripe would,
# for up to a minute (e.g. while ingest fails over to another broker node).
send_checkout() {
    local suffix="${1:-}" event_id="evt_smoke_$(date +%s)_$RANDOM${1:-}" deadline=$((SECONDS + 60))
    SUFFIX="$suffix" EVENT_ID="$event_id" python3 - \
        "$root/fixtures/stripe/events/checkout.session.completed.json" > "$tmp/event.json" <<'PY'
import json, os, sys, time
with open(sys.argv[1], encoding="utf-8") as f:
    event = json.load(f)
event["id"] = os.environ["EVENT_ID"]
event["created"] = int(time.time())
session = event["data"]["object"]
if os.environ["SUFFIX"]:
    session["id"] += os.environ["SUFFIX"]
    session["payment_intent"] += os.environ["SUFFIX"]
json.dump(event, sys.stdout, indent=2)
PY
    echo "event $event_id (session $(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["data"]["object"]["id"])' "$tmp/event.json"))"
    until STRIPE_WEBHOOK_SECRET=whsec_test_secret scripts/send-event.sh "$tmp/event.json" \
            "http://127.0.0.1:$ingest_port/webhooks/stripe/booking"; do
        (( SECONDS < deadline )) || die "ingest did not accept the event within a minute"
        sleep 2
    done
}

# Waits until a purchase exists for the checkout session, then prints it.
wait_purchase() {
    local session="cs_test_a1SampleSessionB2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8s9${1:-}"
    local deadline=$((SECONDS + 60)) sql
    sql="select status, amount_paid_cents, platform_fee_cents, organization_fee_cents, creator_payout_cents
         from purchases where stripe_checkout_session_id = '$session'"
    until [[ "$(psql_query -tA -c "$sql" | cut -d'|' -f1)" == completed ]]; do
        (( SECONDS < deadline )) || die "no completed purchase for $session within a minute"
        sleep 1
    done
    psql_query -c "$sql"
}

start_stack() {
    say "build (${compose_cmd[*]}, DOCKER_BUILDKIT=$DOCKER_BUILDKIT)"
    compose build
    say "up -d"
    compose up -d
    say "waiting until every service is healthy"
    wait_healthy "$@"
    compose ps
    say "sample catalog"
    psql_query -q < scripts/seed-sample-catalog.sql
}

basic() {
    profile_args=()
    start_stack rabbitmq postgres migrate ingest processor

    say "a signed paid checkout to http://127.0.0.1:$ingest_port (the published ingest port)"
    send_checkout
    say "the purchase in Compose's PostgreSQL"
    wait_purchase

    say "scale the processor to 3"
    compose up -d --no-recreate --scale processor=3
    wait_healthy processor
    local ids count
    ids="$(containers processor)"
    count="$(wc -w <<< "$ids")"
    [[ "$count" == 3 ]] || die "expected 3 processor containers, found $count"
    for id in $ids; do
        # /readyz answers 200 only while that processor consumes.
        printf '%s /readyz: %s\n' "$(docker inspect -f '{{.Name}}' "$id")" \
            "$(docker exec "$id" curl -fsS http://127.0.0.1:9090/readyz)"
    done
    # And the broker's view: one consumer per processor on the work queue, each on its own
    # connection from that processor's address.
    local deadline=$((SECONDS + 60)) consumers
    until consumers="$(compose exec -T rabbitmq rabbitmqctl -q list_queues name consumers \
            | awk '$1 == "stripe.events.processor" { print $2 }')" && [[ "$consumers" == 3 ]]; do
        (( SECONDS < deadline )) || die "the work queue has ${consumers:-no} consumers, not 3"
        sleep 2
    done
    compose exec -T rabbitmq rabbitmqctl -q list_queues name consumers messages \
        | awk 'NR == 1 || $1 == "stripe.events.processor"'
    compose exec -T rabbitmq rabbitmqctl -q list_connections peer_host state
    for id in $ids; do
        printf '%s at %s\n' "$(docker inspect -f '{{.Name}}' "$id")" \
            "$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$id")"
    done

    say "down -v"
    compose down -v --remove-orphans
}

cluster() {
    profile_args=(--profile cluster)
    start_stack rabbitmq rabbitmq-2 rabbitmq-3 rabbitmq-replicas postgres migrate ingest processor

    say "waiting until the work queue has a replica on each of the three nodes"
    local deadline=$((SECONDS + 150)) members
    until members="$(compose exec -T rabbitmq rabbitmqctl -q list_queues name members \
            | awk '$1 == "stripe.events.processor"' | grep -o 'rabbit@[a-z0-9-]*' | sort -u | wc -l)" \
            && [[ "$members" == 3 ]]; do
        (( SECONDS < deadline )) || die "the work queue has $members members, not 3"
        sleep 3
    done
    printf 'running nodes: %s\n' "$(compose exec -T rabbitmq rabbitmqctl -q cluster_status \
        | sed -n '/^Running Nodes/,/^Versions/p' | grep -o 'rabbit@[a-z0-9-]*' | tr '\n' ' ')"
    compose exec -T rabbitmq rabbitmqctl -q list_queues name members \
        | awk '$1 == "stripe.events.processor"'

    say "kill -9 the broker node ingest and the processor are connected to (rabbitmq)"
    docker kill -s KILL "$(containers rabbitmq)" >/dev/null
    printf 'rabbitmq: %s\n' "$(docker inspect -f '{{.State.Status}}' "$(containers rabbitmq)")"

    say "a new paid checkout, sent after the kill"
    send_checkout _cluster
    say "the purchase in Compose's PostgreSQL"
    wait_purchase _cluster
    # Each reconnected to the next node listed in AMQP_URL (node=1: rabbitmq-2).
    compose logs --no-color ingest processor 2>&1 | sed 's/\x1b\[[0-9;]*m//g' \
        | grep -E 'connected to RabbitMQ|consuming' | tail -4 || true

    say "down -v"
    compose down -v --remove-orphans
}

for part in "${parts[@]}"; do
    "$part"
done
say "compose-smoke: OK (${parts[*]})"
