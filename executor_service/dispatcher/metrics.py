"""The dispatcher's Prometheus metrics.

Two processes write them: the region workers (calls, claims, retries, dead
letters) and the API (queue depths, read from the store when ``/metrics`` is
scraped). The ``dispatcher`` command points both at one
``PROMETHEUS_MULTIPROC_DIR`` so the API's ``/metrics`` shows them together.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# Claims are one short transaction: sub-millisecond on SQLite, a few ms on PostgreSQL.
CLAIM_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
# Backoffs run from tens of milliseconds to the configured cap (minutes).
RETRY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600)
# Model calls: milliseconds (simulated) to a minute (large remote models).
CALL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)

QUEUE_DEPTH = Gauge(
    "dispatcher_queue_depth",
    "Executions per region and queue (queued, retry_wait, in_flight), read from the store.",
    ["region", "queue"],
    multiprocess_mode="mostrecent",
)
GLOBAL_RETRY_QUEUE = Gauge(
    "dispatcher_global_retry_queue",
    "Failed executions waiting that any region serving the model may retry.",
    multiprocess_mode="mostrecent",
)
DEAD_EXECUTIONS = Gauge(
    "dispatcher_dead_executions",
    "Dead-lettered executions in the store.",
    multiprocess_mode="mostrecent",
)
CIRCUIT_OPEN = Gauge(
    "dispatcher_circuit_open",
    "1 while the region's circuit is open or half-open, else 0 (from the store).",
    ["region"],
    multiprocess_mode="mostrecent",
)
CLAIM_SECONDS = Histogram(
    "dispatcher_claim_seconds",
    "Time of one claim from the store.",
    ["region"],
    buckets=CLAIM_BUCKETS,
)
CLAIMED = Counter(
    "dispatcher_claimed_total",
    "Executions claimed, by region and queue (global_retry, own_retry, new).",
    ["region", "source"],
)
CROSS_REGION_RETRIES = Counter(
    "dispatcher_cross_region_retries_total",
    "Retries run in another region than the one the execution last failed in.",
    ["region"],
)
RETRY_WAIT_SECONDS = Histogram(
    "dispatcher_retry_wait_seconds",
    "Backoff chosen before a retry.",
    ["region"],
    buckets=RETRY_BUCKETS,
)
CALLS = Counter(
    "dispatcher_calls_total",
    "Calls to executors by region and outcome (success, retryable, fatal).",
    ["region", "outcome"],
)
CALL_SECONDS = Histogram(
    "dispatcher_call_seconds",
    "Time of one call to an executor.",
    ["region"],
    buckets=CALL_BUCKETS,
)
DEAD_LETTERS = Counter(
    "dispatcher_dead_letters_total",
    "Executions dead-lettered, by region and reason (max_attempts, non_retryable).",
    ["region", "reason"],
)
LOST_LEASES = Counter(
    "dispatcher_lost_leases_total",
    "Results not written because the lease had expired or been released.",
    ["region"],
)
RESULT_COMMITS = Counter(
    "dispatcher_result_commits_total",
    "Transactions that wrote call results (group commit: several results per transaction).",
)
RESULT_WRITES = Counter(
    "dispatcher_result_writes_total",
    "Call results written (complete or fail); / dispatcher_result_commits_total = per commit.",
)
REAPED = Counter("dispatcher_reaped_total", "Expired leases returned to the queue by the reaper.")
IN_FLIGHT = Gauge(
    "dispatcher_in_flight",
    "Calls in flight in this process.",
    ["region"],
    multiprocess_mode="livesum",
)

# -- pacing (issue 9): backpressure is not failure ------------------------------------
DEFERRALS = Counter(
    "dispatcher_deferrals_total",
    "Calls answered with backpressure (429 rate_limited, provider 429, 503 overloaded): "
    "deferred, not counted as attempts.",
    ["region", "model", "code"],
)
NOT_BEFORE = Gauge(
    "dispatcher_not_before_seconds",
    "Unix time before which the (region, model) claims nothing (0: no wait), shared by "
    "every process through the store; the API reads it from the store.",
    ["region", "model"],
    multiprocess_mode="mostrecent",
)
EFFECTIVE_CONCURRENCY = Gauge(
    "dispatcher_effective_concurrency",
    "Adaptive concurrency (AIMD) of the (region, model) now, from the store.",
    ["region", "model"],
    multiprocess_mode="mostrecent",
)
MAX_CONCURRENCY = Gauge(
    "dispatcher_max_concurrency",
    "The configured concurrency of the (region, model): the ceiling of the adaptive one.",
    ["region", "model"],
    multiprocess_mode="mostrecent",
)
BUDGET_LEVEL = Gauge(
    "dispatcher_budget_level",
    "What is left in the (region, model)'s fleet budget bucket (unit: requests or "
    "tokens), from the store.",
    ["region", "model", "unit"],
    multiprocess_mode="mostrecent",
)
HELD_CLAIMS = Counter(
    "dispatcher_held_claims_total",
    "Claim turns in which a (region, model) was held back, by reason (rate_limited, "
    "budget, concurrency, circuit_open).",
    ["region", "model", "reason"],
)
DEADLINE_EXCEEDED = Counter(
    "dispatcher_deadline_exceeded_total",
    "Executions ended dead because their job's deadline passed.",
)
REUSED = Counter(
    "dispatcher_reused_total",
    "Executions answered with an identical earlier call's answer (params.reuse), by region;"
    " not in dispatcher_calls_total.",
    ["region"],
)

# -- tail latency (issue 13): hedged calls (hedging.py) --------------------------------
HEDGES = Counter(
    "dispatcher_hedges_total",
    "Hedged calls by the region they ran in: sent, and won (answered first).",
    ["region", "outcome"],
)
