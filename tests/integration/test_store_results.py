"""The result path of the SQL stores: group commit (results finishing together share one
transaction, store/group_commit.py), SQLite's result batches at synchronous=NORMAL (a
process crash loses nothing), and PostgreSQL's claim connection of its own.

Batches are forced, not hoped for: the first write's transaction is held open until
the other writes are queued behind it, then they go in one transaction."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
from store_fixtures import PostgresDatabases, sqlite_url

from executor_service.dispatcher.rules import ClaimRequest
from executor_service.dispatcher.store import open_store
from executor_service.dispatcher.store.base import (
    Claim,
    Failover,
    NewJob,
    RegionSpec,
    State,
    StoreError,
)
from executor_service.dispatcher.store.sql_store import SQLStore

T0 = 1_000.0
R1 = RegionSpec("r1", concurrency=100, models=frozenset({"m1"}))
DEADLINE_S = 20.0


@pytest.fixture(scope="module")
def postgres_databases() -> Iterator[PostgresDatabases]:
    databases = PostgresDatabases()
    yield databases
    databases.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield sqlite_url(tmp_path)
        return
    databases: PostgresDatabases = request.getfixturevalue("postgres_databases")
    url = databases.create()
    yield url
    databases.drop(url)


@pytest.fixture
def store(store_url: str) -> Iterator[SQLStore[Any]]:
    store = open_store(store_url)
    assert isinstance(store, SQLStore)
    yield store
    store.close()


def new_job(questions: int) -> NewJob:
    return NewJob(
        tenant="acme",
        questions=[f"question {i}" for i in range(questions)],
        models=["m1"],
        regions_by_model={"m1": ["r1"]},
    )


def claim_all(store: SQLStore[Any], n: int) -> tuple[str, list[Claim]]:
    job, _ = store.create_job(new_job(n), T0)
    claims = store.claim(
        ClaimRequest(R1, limit=n, now=T0, lease_s=30.0, worker="w", tenant_batch=1000)
    )
    assert len(claims) == n
    return job.id, claims


def wait_for(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.002)


def forced_batch(store: SQLStore[Any], writes: list[Callable[[], Any]]) -> list[Any]:
    """Run ``writes[0]`` with its transaction held open until every other write is queued
    behind it, then let it go; returns each write's answer (or exception)."""
    group = store.results
    real = group._transaction
    release, entered = threading.Event(), threading.Event()

    @contextmanager
    def held() -> Iterator[Any]:
        if not entered.is_set():
            entered.set()
            assert release.wait(DEADLINE_S)
        with real() as db:
            yield db

    group._transaction = held  # type: ignore[assignment]
    answers: list[Any] = [None] * len(writes)

    def call(i: int) -> None:
        try:
            answers[i] = writes[i]()
        except Exception as exc:
            answers[i] = exc

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(writes))]
    threads[0].start()
    assert entered.wait(DEADLINE_S)
    for t in threads[1:]:
        t.start()
    wait_for(lambda: len(group._queue) == len(writes) - 1)
    release.set()
    for t in threads:
        t.join(DEADLINE_S)
    group._transaction = real  # type: ignore[assignment]
    return answers


def test_results_finishing_together_share_one_transaction_each_fenced(
    store: SQLStore[Any],
) -> None:
    job_id, claims = claim_all(store, 6)
    a, b, c, d, e, f = claims
    before = (store.results.batches, store.results.ops)
    writes = [
        lambda: store.complete(a.execution_id, a.token, {"output": "A"}, T0 + 1, T0),
        lambda: store.complete(b.execution_id, b.token, {"output": "B"}, T0 + 1, T0),
        # a stale token writes nothing, in a batch as alone
        lambda: store.complete(c.execution_id, "not-the-token", {"output": "C"}, T0 + 1, T0),
        lambda: store.fail(d.execution_id, d.token, {"code": "provider_error"}, T0 + 1, T0, T0 + 5),
        lambda: store.fail(e.execution_id, e.token, {"code": "bad_request"}, T0 + 1, T0, None),
        lambda: store.complete(f.execution_id, f.token, {"output": "F"}, T0 + 1, T0),
    ]

    answers = forced_batch(store, writes)

    assert answers == [True, True, False, True, True, True]
    # two transactions for six results: the first alone, the five queued behind it together
    assert (store.results.batches - before[0], store.results.ops - before[1]) == (2, 6)
    by_id = {x.id: x for x in store.executions(job_id)}
    assert [by_id[x.execution_id].state for x in claims] == [
        State.SUCCEEDED,
        State.SUCCEEDED,
        State.LEASED,
        State.RETRY_WAIT,
        State.DEAD,
        State.SUCCEEDED,
    ]
    assert by_id[a.execution_id].output == "A" and by_id[f.execution_id].output == "F"
    assert [len(by_id[x.execution_id].attempt_log) for x in claims] == [1, 1, 0, 1, 1, 1]


@pytest.mark.postgres
def test_one_result_the_database_refuses_fails_alone(postgres_databases: PostgresDatabases) -> None:
    """jsonb refuses \\u0000: that write aborts the shared transaction, the others are
    written again one by one and kept; only its caller sees the error."""
    url = postgres_databases.create()
    store = open_store(url)
    try:
        assert isinstance(store, SQLStore)
        job_id, (a, b, c) = claim_all(store, 3)
        answers = forced_batch(
            store,
            [
                lambda: store.complete(a.execution_id, a.token, {"output": "A"}, T0 + 1, T0),
                lambda: store.complete(b.execution_id, b.token, {"output": "\u0000"}, T0 + 1, T0),
                lambda: store.complete(c.execution_id, c.token, {"output": "C"}, T0 + 1, T0),
            ],
        )
        assert answers[0] is True and answers[2] is True
        assert isinstance(answers[1], StoreError)
        states = {x.id: x.state for x in store.executions(job_id)}
        assert states == {
            a.execution_id: State.SUCCEEDED,
            b.execution_id: State.LEASED,  # its lease expires; the reaper retries it
            c.execution_id: State.SUCCEEDED,
        }
    finally:
        store.close()
        postgres_databases.drop(url)


def test_sqlite_result_batches_and_claims_commit_normal_and_everything_else_full(
    tmp_path: Path,
) -> None:
    store = open_store(sqlite_url(tmp_path))
    try:
        conn = store._conn  # type: ignore[attr-defined]
        seen: list[int] = []
        real = store.results._transaction  # type: ignore[attr-defined]

        @contextmanager
        def spy() -> Iterator[Any]:
            with real() as db:
                seen.append(db.execute("PRAGMA synchronous").fetchone()["synchronous"])
                yield db

        store.results._transaction = spy  # type: ignore[attr-defined]
        _, (a,) = claim_all(store, 1)  # type: ignore[arg-type]
        assert store.complete(a.execution_id, a.token, {"output": "A"}, T0 + 1, T0)
        assert seen == [1]  # NORMAL inside the result batch
        claimed: list[int] = []
        real_claim = store._result_transaction  # type: ignore[attr-defined]

        @contextmanager
        def claim_spy() -> Iterator[Any]:
            with real_claim() as db:
                claimed.append(db.execute("PRAGMA synchronous").fetchone()["synchronous"])
                yield db

        store._result_transaction = claim_spy  # type: ignore[attr-defined]
        store.claim(ClaimRequest(R1, limit=1, now=T0, lease_s=30.0, worker="w", tenant_batch=1))
        assert claimed == [1]  # the claim too
        assert conn.execute("PRAGMA synchronous").fetchone()["synchronous"] == 2  # FULL after
        assert conn.execute("PRAGMA journal_mode").fetchone()["journal_mode"] == "wal"
    finally:
        store.close()


CRASH_AFTER_RESULT = """
import os, signal, sys
from executor_service.dispatcher.rules import ClaimRequest
from executor_service.dispatcher.store import open_store
from executor_service.dispatcher.store.base import NewJob, RegionSpec
store = open_store(sys.argv[1])
job, _ = store.create_job(NewJob(tenant="acme", questions=["q", "r"], models=["m1"],
                                 regions_by_model={"m1": ["r1"]}), 1000.0)
region = RegionSpec("r1", concurrency=2, models=frozenset({"m1"}))
claim, other = store.claim(ClaimRequest(region, limit=2, now=1000.0, lease_s=30.0, worker="w",
                                        tenant_batch=10))
assert store.complete(claim.execution_id, claim.token, {"output": "kept"}, 1001.0, 1000.0)
print(job.id, other.token, flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # no close, no checkpoint: the WAL as it was written
"""


def test_sqlite_a_claim_and_a_result_written_at_normal_survive_a_process_crash(
    tmp_path: Path,
) -> None:
    url = sqlite_url(tmp_path)
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CRASH_AFTER_RESULT), url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == -9, done.stderr
    job_id, token = done.stdout.split()
    store = open_store(url)
    try:
        done_one, leased = store.executions(job_id)
        assert (done_one.state, done_one.output) == (State.SUCCEEDED, "kept")
        assert leased.state == State.LEASED  # the claim (NORMAL too) was kept
        assert store.heartbeat([(leased.id, token)], 1002.0, 30.0) == {leased.id}
    finally:
        store.close()


@pytest.mark.postgres
def test_postgres_claims_use_their_own_connection_and_recover_when_it_dies(
    postgres_databases: PostgresDatabases,
) -> None:
    url = postgres_databases.create()
    store = open_store(url)
    try:
        job, _ = store.create_job(new_job(3), T0)

        def claim_one() -> list[Claim]:
            return store.claim(
                ClaimRequest(R1, limit=1, now=T0, lease_s=30.0, worker="w", tenant_batch=10)
            )

        assert len(claim_one()) == 1
        conn = store._claim_local.conn  # type: ignore[attr-defined]
        assert len(claim_one()) == 1
        assert store._claim_local.conn is conn  # type: ignore[attr-defined]  # kept between claims
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (conn.info.backend_pid,))
        with pytest.raises(StoreError):
            claim_one()  # the dead connection is found out by this claim, and dropped
        assert len(claim_one()) == 1  # a fresh connection
        states = [e.state for e in store.executions(job.id)]
        assert states == [State.LEASED] * 3
    finally:
        store.close()
        postgres_databases.drop(url)


@pytest.mark.postgres
def test_postgres_claim_takes_four_round_trips_under_a_backlog(
    postgres_databases: PostgresDatabases, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The claim's cost is its round trips under the region's lock (docs: "The claim"):
    the lock with the reads, the new-work candidates, the lease, the commit. A retry due
    adds the retry queries, and the global retry is still taken first."""
    url = postgres_databases.create()
    store = open_store(url)
    try:
        store.create_job(new_job(40), T0)
        waits: list[int] = []
        real_wait = psycopg.Connection.wait

        def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
            waits.append(1)
            return real_wait(self, *args, **kwargs)

        def claim(n: int, now: float = T0) -> list[Claim]:
            request = ClaimRequest(R1, limit=n, now=now, lease_s=30.0, worker="w", tenant_batch=10)
            return store.claim(request)

        claim(4)  # opens the claim connection and makes the pacing row
        monkeypatch.setattr(psycopg.Connection, "wait", counted)
        for _ in range(6):  # past psycopg's prepare threshold
            waits.clear()
            assert len(claim(4)) == 4
        assert len(waits) == 4
        monkeypatch.setattr(psycopg.Connection, "wait", real_wait)
        other = RegionSpec("r2", concurrency=10, models=frozenset({"m1"}))
        store.create_job(
            NewJob(
                tenant="acme",
                questions=["q"],
                models=["m1"],
                regions_by_model={"m1": ["r2"]},
                failover=Failover.ANY,
            ),
            T0,
        )
        (mine,) = store.claim(
            ClaimRequest(other, limit=1, now=T0, lease_s=30.0, worker="w", tenant_batch=10)
        )
        assert store.fail(mine.execution_id, mine.token, {"code": "x"}, T0 + 1, T0, T0 + 2)
        first, *_ = claim(4, now=T0 + 3)  # the retry is due: r1 takes it first
        assert (first.execution_id, first.source) == (mine.execution_id, "global_retry")
    finally:
        store.close()
        postgres_databases.drop(url)
