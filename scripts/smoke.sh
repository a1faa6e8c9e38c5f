#!/usr/bin/env bash
# Smoke check of a deployed executor: health, one real execute, one bad request.
#
#   scripts/smoke.sh URL [KEY]
#
# URL is the executor's base URL (https://...); KEY its API key, if it has one.
# SMOKE_MODEL picks the model (default smollm2-135m); SMOKE_TIMEOUT the seconds
# curl may wait per request (default 60). Exits non-zero on the first failure.
set -euo pipefail

url="${1:?usage: scripts/smoke.sh URL [KEY]}"
url="${url%/}"
key="${2:-${ES_API_KEY:-}}"
model="${SMOKE_MODEL:-smollm2-135m}"
max_time="${SMOKE_TIMEOUT:-60}"
auth=()
if [[ -n "$key" ]]; then auth=(-H "Authorization: Bearer $key"); fi
body_file="$(mktemp)"
trap 'rm -f "$body_file"' EXIT

fail() { echo "FAIL: $*" >&2; echo "--- response body:" >&2; cat "$body_file" >&2; echo >&2; exit 1; }

# request METHOD PATH [JSON]: prints the HTTP status, leaves the body in $body_file
request() {
  local method="$1" path="$2" data="${3:-}"
  local args=(-sS -o "$body_file" -w '%{http_code}' --max-time "$max_time" -X "$method")
  if [[ -n "$data" ]]; then args+=(-H 'Content-Type: application/json' --data "$data"); fi
  curl "${args[@]}" "${auth[@]}" "$url$path" || echo "000"
}

status="$(request GET /health)"
[[ "$status" == 200 ]] || fail "GET /health answered $status"
grep -q '"status"' "$body_file" || fail "GET /health body is not the health document"
echo "ok   GET /health -> 200"

status="$(request POST /execute "{\"model\": \"$model\", \"prompt\": \"What is 2+2? Answer briefly.\", \"max_tokens\": 32}")"
[[ "$status" == 200 ]] || fail "POST /execute ($model) answered $status"
grep -q '"output"' "$body_file" || fail "POST /execute answered 200 without an output"
grep -q '"completion_tokens"' "$body_file" || fail "POST /execute answered 200 without usage"
echo "ok   POST /execute ($model) -> 200: $(head -c 300 "$body_file")"

status="$(request POST /execute "{\"model\": \"$model\", \"prompt\": \"\", \"max_tokens\": 0}")"
[[ "$status" == 422 ]] || fail "a bad request answered $status, expected 422"
grep -q '"validation_error"' "$body_file" || fail "the 422 body has no validation_error code"
echo "ok   POST /execute (bad request) -> 422 validation_error"
echo "smoke check passed: $url"
