#!/usr/bin/env bash
# Signs a Stripe event the way Stripe does and POSTs it to ingest.
#
# Usage: scripts/send-event.sh [FILE] [URL]
#   FILE  event JSON to send, `-` for standard input
#         (default: fixtures/stripe/events/checkout.session.completed.json)
#   URL   webhook endpoint (default: http://127.0.0.1:8080/webhooks/stripe/booking)
#
# Environment:
#   STRIPE_WEBHOOK_SECRET  endpoint secret (default: whsec_test_secret). A comma-separated
#                          list signs once per secret, as Stripe does while a secret rolls.
#   EVENT_ID               replace the event's top-level "id" (send a fresh event; note the
#                          payment intent stays the same, so the processor sees a duplicate
#                          payment and records nothing new)
#   TIMESTAMP              the signature's `t` (default: now, in unix seconds)
#   SIGN_ONLY=1            print only the Stripe-Signature header value; send nothing
#
# Signature: v1 = hex(HMAC-SHA256(key = the whole secret string, "<t>.<exact body bytes>")).
# The body is sent byte for byte as signed. Exits non-zero unless the answer is 2xx.
#
# Check against Stripe's documented vector:
#   printf '%s' '{"id":"evt_test_webhook","object":"event"}' \
#     | SIGN_ONLY=1 TIMESTAMP=1492774577 scripts/send-event.sh -
#   → t=1492774577,v1=88a022085c6bdb887b02cb26ff76dd681234d9675c0f22844059f55552a8883a
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
file="${1:-$root/fixtures/stripe/events/checkout.session.completed.json}"
url="${2:-http://127.0.0.1:8080/webhooks/stripe/booking}"
secrets="${STRIPE_WEBHOOK_SECRET:-whsec_test_secret}"
t="${TIMESTAMP:-$(date +%s)}"

if ! [[ "$t" =~ ^[0-9]+$ ]]; then
    echo "TIMESTAMP must be unix seconds, got '$t'" >&2
    exit 2
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
body="$tmp/body"

# The exact bytes to sign and send.
if [[ "$file" == "-" ]]; then
    cat > "$body"
elif [[ -f "$file" ]]; then
    cp "$file" "$body"
else
    echo "no such file: $file" >&2
    exit 2
fi

if [[ -n "${EVENT_ID:-}" ]]; then
    EVENT_ID="$EVENT_ID" python3 - "$body" <<'PY'
import json, os, sys
path = sys.argv[1]
with open(path, encoding="utf-8") as f:
    event = json.load(f)
if not isinstance(event, dict):
    sys.exit("the body is not a JSON object; cannot set its id")
event["id"] = os.environ["EVENT_ID"]
with open(path, "w", encoding="utf-8") as f:
    json.dump(event, f, indent=2, ensure_ascii=False)
PY
fi

# One v1 per secret, like Stripe during a secret rotation.
header="t=$t"
IFS=',' read -r -a secret_list <<< "$secrets"
for secret in "${secret_list[@]}"; do
    secret="${secret//[[:space:]]/}"
    [[ -n "$secret" ]] || continue
    sig="$( { printf '%s.' "$t"; cat "$body"; } | openssl dgst -sha256 -hmac "$secret" -r | cut -d' ' -f1)"
    header="$header,v1=$sig"
done
if [[ "$header" != *",v1="* ]]; then
    echo "STRIPE_WEBHOOK_SECRET is empty" >&2
    exit 2
fi

if [[ "${SIGN_ONLY:-0}" == "1" ]]; then
    printf '%s\n' "$header"
    exit 0
fi

status="$(curl -sS --max-time 30 \
    -o "$tmp/response" -D "$tmp/headers" -w '%{http_code}' \
    -X POST \
    -H "Stripe-Signature: $header" \
    -H 'Content-Type: application/json; charset=utf-8' \
    -H 'User-Agent: Stripe/1.0 (+https://stripe.com/docs/webhooks)' \
    --data-binary @"$body" \
    "$url")"

echo "HTTP $status"
retry_after="$(grep -i '^retry-after:' "$tmp/headers" | tr -d '\r' || true)"
[[ -z "$retry_after" ]] || echo "$retry_after"
cat "$tmp/response"
echo

[[ "$status" == 2?? ]]
