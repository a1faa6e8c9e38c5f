"""D4's peer: what a user would pick instead of the dispatcher, Celery with a Redis broker.

One task per call: POST the same ``/execute`` body to the same instant executor the
dispatcher and the plain client use, through one ``requests`` session whose pool has
one connection per worker thread (what the dispatcher's executor client does). Run
as a user would for durability of the work: ``acks_late`` (a task is acknowledged
only once it ran, so a worker crash redelivers it), prefetch 1 (a thread takes one
task at a time), the thread pool with the same number of threads as the dispatcher's
slots, and results kept in Redis (the dispatcher keeps every result, too). Each
finished task also increments a counter key, so the benchmark counts completions
with one cheap read instead of scanning result keys.

Configured from the environment (set by ``dispatcher_throughput.py``, which starts
``celery -A celery_peer worker`` with this directory on ``PYTHONPATH``):

    BENCH_CELERY_BROKER   redis://127.0.0.1:6379/15
    BENCH_CELERY_QUEUE    a queue name of this run's own (other runs share the Redis)
    BENCH_CELERY_COUNTER  the counter key
    BENCH_CELERY_THREADS  HTTP connection pool size (= worker threads)
"""

from __future__ import annotations

import os
from typing import Any

import redis
import requests
from celery import Celery
from requests.adapters import HTTPAdapter

BROKER = os.environ.get("BENCH_CELERY_BROKER", "redis://127.0.0.1:6379/15")
QUEUE = os.environ.get("BENCH_CELERY_QUEUE", "bench-peer")
COUNTER = os.environ.get("BENCH_CELERY_COUNTER", "bench-peer-done")
THREADS = int(os.environ.get("BENCH_CELERY_THREADS", "16"))

app = Celery("celery_peer", broker=BROKER, backend=BROKER)
app.conf.update(
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    task_default_queue=QUEUE,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_expires=600,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)

_session = requests.Session()
_session.mount("http://", HTTPAdapter(pool_connections=1, pool_maxsize=THREADS, max_retries=0))
_session.headers["Content-Type"] = "application/json"
_counter = redis.Redis.from_url(BROKER)


@app.task(name="bench.execute")
def execute(url: str, body: str) -> dict[str, Any]:
    """One executor call; the answer is the task's result (kept in Redis)."""
    response = _session.post(url, data=body, timeout=(5, 65))
    _counter.incr(COUNTER)
    return {"status": response.status_code, "body": response.json()}
