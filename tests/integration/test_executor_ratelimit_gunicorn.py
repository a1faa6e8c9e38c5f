"""A rate-limited simulated model under real gunicorn with several workers: the
workers draw from one bucket (``rate_state_file``), so the replica as a whole keeps
to the limit, as one provider deployment does, and answers 429 ``rate_limited`` over
HTTP beyond it."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from support import Gunicorn, write_catalog

pytestmark = pytest.mark.slow

RPM = 12


def test_workers_share_one_limit(tmp_path: Path) -> None:
    catalog = write_catalog(
        tmp_path / "catalog.toml",
        {
            "sim-rpm": {
                "provider": "simulated",
                "latency_s": 0.02,
                "rpm": RPM,
                "rate_window_s": 3600,  # no refill during the test: exact counts
                "rate_state_file": str(tmp_path / "bucket.json"),
                "rate_log": str(tmp_path / "arrivals.log"),
            }
        },
    )
    env = {
        "ES_CATALOG": str(catalog),
        "WEB_CONCURRENCY": "3",
        "GUNICORN_THREADS": "2",
        # gthread: a worker accepts only as many connections as it has threads, so the
        # 6 clients are spread over the 3 workers (a gevent worker may accept them all,
        # and then the bucket's sharing between workers would not be tested).
        "GUNICORN_WORKER_CLASS": "gthread",
        "GUNICORN_ACCESSLOG": "-",
    }
    body = {"model": "sim-rpm", "prompt": "What is 2+2?", "max_tokens": 8}
    with Gunicorn(tmp_path, env) as server, ThreadPoolExecutor(6) as pool:
        responses = list(
            pool.map(
                lambda _: requests.post(server.url + "/execute", json=body, timeout=30), range(30)
            )
        )
        log = server.log()
    statuses = [r.status_code for r in responses]
    assert statuses.count(200) == RPM, statuses
    assert statuses.count(429) == 30 - RPM, statuses
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.json()["error"]["code"] == "rate_limited"
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    lines = (tmp_path / "arrivals.log").read_text().splitlines()
    assert len(lines) == 30
    # the admitted calls came through more than one worker, and still only RPM of them
    served = set(re.findall(r'"POST /execute HTTP/1.1" 200 \d+ \d+ms pid=<(\d+)>', log))
    assert len(served) >= 2, "the 200s all came from one worker: sharing was not tested"
