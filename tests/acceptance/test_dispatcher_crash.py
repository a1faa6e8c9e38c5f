"""Crash safety: SIGKILL the dispatcher in the middle of a job and start it again. The job
completes and every execution has exactly one result: none lost, none duplicated.

A short lease (ES_LEASE_S=2) lets the restarted dispatcher's reaper recover the calls
the killed one had in flight within about three seconds.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
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
from support import wait_until

pytestmark = pytest.mark.slow
logger = logging.getLogger(__name__)

QUESTIONS = 20
REGIONS = ("r1", "r2")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'd.db'}"
    else:
        with postgres_database() as url:
            yield url


def test_sigkill_mid_job_then_restart_completes_every_execution_once(
    tmp_path: Path, database_url: str
) -> None:
    model = {"sim": {"provider": "simulated", "latency_s": 0.2}}
    env = {"ES_LEASE_S": "2"}
    with executor(tmp_path, "r1", model) as e1, executor(tmp_path, "r2", model) as e2:
        regions = write_regions(
            tmp_path / "regions.toml", {"r1": (e1.url, 2, ["sim"]), "r2": (e2.url, 2, ["sim"])}
        )
        first = DispatcherProcess(tmp_path, database_url, regions, env).start()
        try:
            api = first.api()
            job = api.submit({"questions": [f"q{i}" for i in range(QUESTIONS)], "models": ["sim"]})
            wait_until(
                lambda: (
                    (s := api.job(job["id"])["states"]).get("succeeded", 0) >= 6
                    and s.get("leased", 0) >= 1
                ),
                30,
                interval=0.02,
                what="the job half-way, calls in flight",
            )
        finally:
            first.kill()
        with DispatcherProcess(tmp_path, database_url, regions, env) as second:
            api = second.api()
            crashed = api.job(job["id"])["states"]
            assert crashed.get("leased", 0) >= 1, crashed  # the crash left leases behind
            wait_finished(api, job["id"], timeout=60)
            executions = api.results(job["id"])["executions"]
        calls = calls_by_request_id(e1, e2)

    assert len(executions) == QUESTIONS * len(REGIONS)
    keys = Counter((e["question_index"], e["requested_region"]) for e in executions)
    assert set(keys.values()) == {1}
    assert {e["state"] for e in executions} == {"succeeded"}
    for e in executions:
        assert e["output"] == f"simulated answer to: {e['question']}"
        assert [a["ok"] for a in e["attempt_log"]].count(True) == 1
    recovered = [e for e in executions if e["attempts"] > 1]
    assert recovered, "some calls were in flight at the kill"
    for e in recovered:
        assert e["attempt_log"][0]["error"]["code"] == "lease_expired"
    # Each attempt reached an executor at most once.
    assert all(n == 1 for n in calls.values())
    logger.warning(
        "%s: %d executions recovered from expired leases",
        database_url.split(":")[0],
        len(recovered),
    )
