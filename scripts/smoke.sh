#!/usr/bin/env bash
# Smoke check of a deployed executor. Run with no argument (or -h) for the usage.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: scripts/smoke.sh URL [KEY]

  URL   the executor's base URL, e.g. https://executor-eastus.example.net
  KEY   its API key (default: $ES_API_KEY); leave it out for an executor without keys

Checks, in order, and stops at the first that fails:
  GET /health -> 200; GET /ready -> 200; a wrong key -> 401 (when KEY is given);
  one real POST /execute -> 200 with an output; a bad request -> 422 validation_error.

Environment: SMOKE_MODEL (the model to call, default smollm2-135m),
             SMOKE_TIMEOUT (seconds curl may wait per request, default 60).
Exit code:   0 every check passed, 1 a check failed, 2 bad usage.
EOF
}

case "${1:-}" in
  -h | --help) usage; exit 0 ;;
  "") usage >&2; exit 2 ;;
esac
if [[ $# -gt 2 ]]; then
  echo "smoke.sh: too many arguments" >&2; usage >&2; exit 2
fi

url="${1%/}"
key="${2:-${ES_API_KEY:-}}"
model="${SMOKE_MODEL:-smollm2-135m}"
max_time="${SMOKE_TIMEOUT:-60}"
body_file="$(mktemp)"
err_file="$(mktemp)"
trap 'rm -f "$body_file" "$err_file"' EXIT

fail() {
  echo "FAIL: $*" >&2
  if [[ -s "$body_file" ]]; then
    echo "--- response body:" >&2; head -c 2000 "$body_file" >&2; echo >&2
  fi
  exit 1
}

# request METHOD PATH [JSON] [BEARER]: sets $status (the HTTP status) and leaves the
# body in $body_file; stops the script with a plain message if the host cannot be reached.
request() {
  local method="$1" path="$2" data="${3:-}" bearer="${4-$key}"
  local args=(-sS -o "$body_file" -w '%{http_code}' --max-time "$max_time" -X "$method")
  if [[ -n "$data" ]]; then args+=(-H 'Content-Type: application/json' --data "$data"); fi
  if [[ -n "$bearer" ]]; then args+=(-H "Authorization: Bearer $bearer"); fi
  : >"$body_file"
  if ! status="$(curl "${args[@]}" "$url$path" 2>"$err_file")"; then
    fail "cannot reach $url ($method $path): $(tr -d '\n' <"$err_file")." \
      "Is the URL right, and is the executor running and reachable from here?"
  fi
}

# hint STATUS: what a user can do about an unexpected answer
hint() {
  case "$1" in
    401) echo " (unauthorized: give the executor's API key as the second argument)" ;;
    404) echo " (not found: is SMOKE_MODEL in the executor's catalog? see GET /models)" ;;
    503) echo " (not ready or overloaded: the models may still be loading; retry in a minute)" ;;
    *) echo "" ;;
  esac
}

request GET /health
[[ "$status" == 200 ]] || fail "GET /health answered $status, expected 200$(hint "$status")"
grep -q '"status"' "$body_file" || fail "GET /health answered 200 but not with the health document"
echo "ok   GET /health -> 200"

request GET /ready
[[ "$status" == 200 ]] || fail "GET /ready answered $status, expected 200$(hint "$status")"
echo "ok   GET /ready -> 200"

if [[ -n "$key" ]]; then
  request GET /models "" "wrong-$RANDOM-key"
  [[ "$status" == 401 ]] ||
    fail "GET /models with a wrong key answered $status, expected 401: the executor must refuse it"
  echo "ok   GET /models (wrong key) -> 401"
else
  echo "skip wrong-key check: no KEY given (an executor without keys accepts any)"
fi

request POST /execute "{\"model\": \"$model\", \"prompt\": \"What is 2+2? Answer briefly.\", \"max_tokens\": 32}"
[[ "$status" == 200 ]] || fail "POST /execute ($model) answered $status, expected 200$(hint "$status")"
grep -q '"output"' "$body_file" || fail "POST /execute answered 200 without an output"
grep -q '"completion_tokens"' "$body_file" || fail "POST /execute answered 200 without usage"
echo "ok   POST /execute ($model) -> 200: $(head -c 300 "$body_file")"

request POST /execute "{\"model\": \"$model\", \"prompt\": \"\", \"max_tokens\": 0}"
[[ "$status" == 422 ]] || fail "a bad request answered $status, expected 422$(hint "$status")"
grep -q '"validation_error"' "$body_file" || fail "the 422 body has no validation_error code"
echo "ok   POST /execute (bad request) -> 422 validation_error"
echo "smoke check passed: $url"
