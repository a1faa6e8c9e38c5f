"""Wake-ups across dispatcher processes on PostgreSQL (LISTEN/NOTIFY, store/pg_notify.py).

Two "processes" are two store instances on one database (separate connections, as two
dispatcher hosts would have). The dispatcher under test polls only every 60 s, so
anything it does sooner than that, it did because the other process's commit told it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from store_fixtures import PostgresDatabases
from support import wait_until

from executor_service.dispatcher.client import CallResult, Outcome
from executor_service.dispatcher.regions import Regions
from executor_service.dispatcher.rules import ClaimRequest
from executor_service.dispatcher.scheduler import BackoffPolicy, Jitter
from executor_service.dispatcher.store import open_store
from executor_service.dispatcher.store.base import Failover, NewJob, RegionSpec, State, Store
from executor_service.dispatcher.worker import Dispatcher, WorkerConfig

pytestmark = pytest.mark.postgres

SLOW_POLL = WorkerConfig(
    lease_s=30.0,
    claim_poll_s=60.0,  # far longer than any wait below: only a notice can wake us in time
    shutdown_grace_s=2.0,
    circuit_threshold=100,
    backoff=BackoffPolicy(0.01, 0.05, Jitter.NONE),
)
REGION_A = RegionSpec("a", concurrency=4, models=frozenset({"m"}))
ONLY_B = Regions.from_mapping(
    {"regions": {"b": {"url": "http://b", "concurrency": 4, "models": ["m"]}}}
)
WAIT_S = 15.0


class Answers:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def execute(self, model: str, prompt: str, request_id: str, params: Any) -> CallResult:
        self.calls.append(request_id)
        return CallResult(Outcome.SUCCESS, body={"output": f"b:{prompt}"})

    def close(self) -> None:
        pass


@pytest.fixture
def database() -> Iterator[str]:
    databases = PostgresDatabases()
    url = databases.create()
    yield url
    databases.drop(url)
    databases.close()


@pytest.fixture
def two_stores(database: str) -> Iterator[tuple[Store, Store]]:
    here, there = open_store(database), open_store(database)
    yield here, there
    here.close()
    there.close()


def new_job(regions: list[str], failover: Failover = Failover.ANY) -> NewJob:
    return NewJob(
        tenant="t",
        questions=["q0"],
        models=["m"],
        regions_by_model={"m": regions},
        failover=failover,
    )


def test_a_commit_in_one_process_is_heard_in_another(two_stores: tuple[Store, Store]) -> None:
    here, there = two_stores
    heard: list[float] = []
    got = threading.Event()

    def on_due(at: float) -> None:
        heard.append(at)
        got.set()

    listener = here.subscribe(on_due)
    assert listener is not None
    try:
        wait_until(lambda: listener.listening.is_set(), WAIT_S, what="LISTEN")  # type: ignore[attr-defined]
        now = time.time()
        there.create_job(new_job(["a"]), now)
        assert got.wait(WAIT_S)
        assert heard == [pytest.approx(now, abs=1e-5)]
        got.clear()
        (claim,) = there.claim(
            ClaimRequest(REGION_A, limit=1, now=now, lease_s=30.0, worker="w", tenant_batch=10)
        )
        retry_at = now + 7.5
        assert there.fail(claim.execution_id, claim.token, {"code": "x"}, now, now, retry_at)
        assert got.wait(WAIT_S)
        assert heard[-1] == pytest.approx(retry_at, abs=1e-5)
        got.clear()
        # a deferred call (429: backpressure) falls due too; a takes its own retry back
        # once the hand-off has passed
        later = retry_at + 1.0
        (again,) = there.claim(
            ClaimRequest(REGION_A, limit=1, now=later, lease_s=30.0, worker="w", tenant_batch=10)
        )
        deferred_to = later + 3.25
        assert there.defer(again.execution_id, again.token, {"code": "rate_limited"}, later,
                           later, deferred_to)  # fmt: skip
        assert got.wait(WAIT_S)
        assert heard[-1] == pytest.approx(deferred_to, abs=1e-5)
    finally:
        listener.close()


def test_a_rolled_back_transaction_announces_nothing(two_stores: tuple[Store, Store]) -> None:
    here, there = two_stores
    heard: list[float] = []
    listener = here.subscribe(heard.append)
    assert listener is not None
    try:
        wait_until(lambda: listener.listening.is_set(), WAIT_S, what="LISTEN")  # type: ignore[attr-defined]
        now = time.time()
        there.create_job(new_job(["a"]), now)  # a marker: committed, heard
        wait_until(lambda: len(heard) == 1, WAIT_S, what="the marker notice")
        (claim,) = there.claim(
            ClaimRequest(REGION_A, limit=1, now=now, lease_s=30.0, worker="w", tenant_batch=10)
        )
        assert not there.fail(claim.execution_id, "stale-token", {"code": "x"}, now, now, now + 1)
        there.create_job(new_job(["a"]), now + 2)  # a second marker after the stale write
        wait_until(lambda: len(heard) == 2, WAIT_S, what="the second marker")
        assert heard == [pytest.approx(now, abs=1e-5), pytest.approx(now + 2, abs=1e-5)]
    finally:
        listener.close()


def test_an_idle_region_takes_a_retry_another_process_scheduled_when_it_falls_due(
    two_stores: tuple[Store, Store],
) -> None:
    """D2 across processes: region b (this dispatcher, polling every 60 s) takes the
    failover-any retry that region a (another process) scheduled, when it is due."""
    here, there = two_stores
    answers = Answers()
    dispatcher = Dispatcher(here, ONLY_B, SLOW_POLL, client_factory=lambda _r: answers)
    dispatcher.start()
    try:
        listener = dispatcher._subscription
        assert listener is not None
        wait_until(lambda: listener.listening.is_set(), WAIT_S, what="LISTEN")  # type: ignore[attr-defined]
        now = time.time()
        job, _ = there.create_job(new_job(["a"]), now)
        (claim,) = there.claim(
            ClaimRequest(REGION_A, limit=1, now=now, lease_s=30.0, worker="w", tenant_batch=10)
        )
        failed_at = time.time()
        retry_at = failed_at + 0.3
        assert there.fail(
            claim.execution_id, claim.token, {"code": "down"}, failed_at, now, retry_at
        )
        wait_until(lambda: there.job_finished(job.id), WAIT_S, what="the retry in region b")
        (execution,) = there.executions(job.id)
        assert execution.state is State.SUCCEEDED and execution.executed_region == "b"
        second = execution.attempt_log[1]
        assert second.region == "b"
        assert second.started_at >= retry_at  # not before it was due
        assert second.started_at < failed_at + SLOW_POLL.claim_poll_s / 2  # not by the poll
    finally:
        dispatcher.stop(grace_s=1.0)


def test_the_listener_reconnects_and_wakes_everyone_once(two_stores: tuple[Store, Store]) -> None:
    here, there = two_stores
    heard: list[float] = []
    listener = here.subscribe(heard.append)
    assert listener is not None
    try:
        wait_until(lambda: listener.listening.is_set(), WAIT_S, what="LISTEN")  # type: ignore[attr-defined]
        conninfo = here._conninfo  # type: ignore[attr-defined]
        with psycopg.connect(conninfo, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND query LIKE 'LISTEN%'"
            )
        wait_until(lambda: 0.0 in heard, WAIT_S, what="the catch-up wake after reconnecting")
        now = time.time()
        there.create_job(new_job(["a"]), now)
        wait_until(lambda: len(heard) == 2, WAIT_S, what="a notice on the new connection")
        assert heard == [0.0, pytest.approx(now, abs=1e-5)]
    finally:
        listener.close()
