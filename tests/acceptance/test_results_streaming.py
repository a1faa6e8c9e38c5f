"""/health answers while four big result fetches stream (issue 10, item 7).

``executor-service dispatcher api`` (the documented command, its default worker class:
one gevent worker) over a SQLite store holding a job of 20,000 executions with long
answers, written straight into the store. Four clients stream the whole job (CSV,
JSONL, CSV, JSONL) and keep reading; once each has its first bytes, /health must
answer while all four are still streaming: the order of events is asserted, not a
latency. Before, a streaming greenlet held the worker's event loop from the first page
to the last whenever its client read as fast as it wrote (loopback): the fetches ran one
after the other and /health waited for them.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
from dispatcher_harness import API_KEYS, KEYS, write_regions
from support import REPO, free_port, wait_until

from executor_service.dispatcher.store import open_store
from executor_service.dispatcher.store.base import NewJob

pytestmark = pytest.mark.slow

QUESTIONS = 5_000  # x 2 models x 2 regions = 20,000 executions
ANSWER = "An answer of some length, as a model would give it. " * 40  # ~2 kB


def big_job(url: str) -> str:
    store = open_store(url)
    try:
        job, _ = store.create_job(
            NewJob(
                tenant="alice",
                questions=[f"question {i}" for i in range(QUESTIONS)],
                models=["m1", "m2"],
                regions_by_model={"m1": ["r1", "r2"], "m2": ["r1", "r2"]},
            ),
            time.time(),
        )
    finally:
        store.close()
    with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
        conn.execute(
            "UPDATE executions SET state = 'succeeded', output = question || ?, attempts = 1 "
            "WHERE job_id = ?",
            (ANSWER, job.id),
        )
    return job.id


def test_health_answers_while_four_big_fetches_stream(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'd.db'}"
    job_id = big_job(url)
    regions = write_regions(
        tmp_path / "regions.toml",
        {"r1": ("http://127.0.0.1:9", 1, ["m1", "m2"]), "r2": ("http://127.0.0.1:9", 1, ["m1"])},
    )
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    env = {
        **os.environ,
        "ES_DATABASE_URL": url,
        "ES_REGIONS_FILE": str(regions),
        "ES_API_KEYS": API_KEYS,
        "ES_LOG_LEVEL": "warning",
        "PROMETHEUS_MULTIPROC_DIR": str(metrics),
    }
    argv = [sys.executable, "-m", "executor_service.cli", "dispatcher", "api", "--port", str(port)]
    with (tmp_path / "api.log").open("wb") as log:
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(
            lambda: requests.get(base + "/health", timeout=2).ok, 60, what="the dispatcher API"
        )
        headers = {"Authorization": f"Bearer {KEYS['alice']}"}
        started = [threading.Event() for _ in range(4)]
        finished = [threading.Event() for _ in range(4)]
        sizes = [0] * 4
        errors: list[BaseException] = []

        def fetch(i: int) -> None:
            try:
                fmt = ("csv", "jsonl")[i % 2]
                with requests.get(
                    f"{base}/jobs/{job_id}/results",
                    params={"format": fmt},
                    headers=headers,
                    stream=True,
                    timeout=120,
                ) as r:
                    assert r.status_code == 200
                    for chunk in r.iter_content(64 * 1024):
                        sizes[i] += len(chunk)
                        started[i].set()
            except BaseException as exc:
                errors.append(exc)
            finally:
                started[i].set()
                finished[i].set()

        threads = [threading.Thread(target=fetch, args=(i,), daemon=True) for i in range(4)]
        for t in threads:
            t.start()
        for event in started:
            assert event.wait(60)
        in_progress_before = [not f.is_set() for f in finished]
        health = requests.get(base + "/health", timeout=120)
        in_progress_after = [not f.is_set() for f in finished]
        for t in threads:
            t.join(120)
    finally:
        proc.terminate()
        proc.wait(30)

    assert not errors, errors
    # (Before: one stream held the worker to its end, so the four never ran side by side.)
    assert all(in_progress_before), "the four fetches were never all in progress at once"
    assert health.status_code == 200
    assert all(in_progress_after), "/health answered only after a fetch had ended"
    assert all(size > 20_000 * len(ANSWER) for size in sizes)  # each got the whole job
