"""Two dispatcher processes on one PostgreSQL never run the same execution twice, and
together never send a region more than its slots.

The executors count calls: each logs the request id (job.execution.attempt) of every
``POST /execute``. Their admission limit equals the region's slots (2 threads, 2 slots),
so two processes each sending 2 calls at once would show up as 503 overloaded.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import pytest
from dispatcher_harness import (
    DispatcherProcess,
    calls_by_request_id,
    executor,
    postgres_database,
    wait_finished,
    write_regions,
)

pytestmark = [pytest.mark.slow, pytest.mark.postgres]
logger = logging.getLogger(__name__)

QUESTIONS = 30


def test_two_dispatchers_share_the_work_without_duplicates(tmp_path: Path) -> None:
    model = {"sim": {"provider": "simulated", "latency_s": 0.1}}
    with (
        postgres_database() as url,
        executor(tmp_path, "r1", model) as e1,
        executor(tmp_path, "r2", model) as e2,
    ):
        regions = write_regions(
            tmp_path / "regions.toml", {"r1": (e1.url, 2, ["sim"]), "r2": (e2.url, 2, ["sim"])}
        )
        # A process that holds a region's seats takes each freed one again at once, so a
        # process that started late, or lost the first claim of both regions, could find
        # every seat taken for the whole (short) job. So the worker-only process starts
        # first and is claiming before the job exists, and each claim takes one execution
        # (ES_TENANT_BATCH=1): the first claim of a region leaves its other seat to the
        # other process.
        env = {"ES_TENANT_BATCH": "1"}
        with (
            DispatcherProcess(tmp_path, url, regions, env=env, api=False) as d2,
            DispatcherProcess(tmp_path, url, regions, env=env) as d1,
        ):
            api = d1.api()
            job = api.submit({"questions": [f"q{i}" for i in range(QUESTIONS)], "models": ["sim"]})
            wait_finished(api, job["id"], timeout=90)
            executions = api.results(job["id"])["executions"]
            assert d2.proc is not None and d2.proc.poll() is None  # both ran throughout
            shares = (d1.calls_made(), d2.calls_made())
        calls = calls_by_request_id(e1, e2)

    assert len(executions) == 2 * QUESTIONS
    assert {e["state"] for e in executions} == {"succeeded"}
    assert {e["attempts"] for e in executions} == {1}
    mine = Counter({rid: n for (rid, status), n in calls.items() if rid.startswith(job["id"])})
    statuses = Counter(status for (rid, status) in calls if rid.startswith(job["id"]))
    logger.warning("executor calls by status: %s; by dispatcher %s", dict(statuses), shares)
    assert sum(shares) == 2 * QUESTIONS and min(shares) > 0  # both processes did work
    assert statuses == {200: 2 * QUESTIONS}  # no 503: never more than the slots at once
    expected = {f"{job['id']}.{e['id']}.1" for e in executions}
    assert set(mine) == expected and set(mine.values()) == {1}
