"""The executor's Prometheus metrics (``executor_*``). Under gunicorn every worker writes
its own files in PROMETHEUS_MULTIPROC_DIR (set by the gunicorn config before any worker
imports this) and ``/metrics`` adds them up (``observability.metrics_response``)."""

from __future__ import annotations

import functools

from prometheus_client import Counter, Gauge, Histogram

# Model calls take from milliseconds (simulated) to a minute (large remote models).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)

REQUESTS = Counter(
    "executor_requests_total", "Requests to /execute by model and HTTP status.", ["model", "status"]
)
REQUEST_SECONDS = Histogram(
    "executor_request_seconds",
    "Total time of /execute requests.",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
MODEL_SECONDS = Histogram(
    "executor_model_seconds",
    "Time spent inside the model provider.",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
IN_FLIGHT = Gauge("executor_in_flight", "Model calls in flight.", multiprocess_mode="livesum")
# The admission limit of a worker process (ES_MAX_IN_FLIGHT or its default): in flight / this
# is how full a worker is, and load tests report the limit a server really ran with.
ADMISSION_LIMIT = Gauge(
    "executor_admission_limit", "Model calls a worker admits at once.", multiprocess_mode="livemax"
)
ADMISSION_REJECTIONS = Counter(
    "executor_admission_rejections_total", "Requests answered 503 because the process was full."
)


# The labelled series of each call, looked up once per (model, status): ``labels()`` takes a
# lock and builds a key on every call (E1). Both sets are bounded: catalog models and
# ``unknown``, the contract's status codes.
@functools.cache
def requests_of(model: str, status: int) -> Counter:
    return REQUESTS.labels(model, str(status))


@functools.cache
def request_seconds_of(model: str) -> Histogram:
    return REQUEST_SECONDS.labels(model)


@functools.cache
def model_seconds_of(model: str) -> Histogram:
    return MODEL_SECONDS.labels(model)
