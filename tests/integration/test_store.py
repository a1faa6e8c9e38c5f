"""The dispatcher store's behaviour, one suite run against the memory store, SQLite and
PostgreSQL (the memory store is what the worker and API unit tests use: this suite is
what keeps it honest).

Time is passed in (``now``), so leases expire and retries fall due without
sleeping. Concurrency tests use several store instances (separate connections,
as separate dispatcher processes would) hammering one database from threads.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from store_fixtures import PostgresDatabases, sqlite_url

from executor_service.dispatcher import pacing
from executor_service.dispatcher.pacing import Budget
from executor_service.dispatcher.rules import DEFAULT_RETRY_HANDOFF_S, ClaimRequest
from executor_service.dispatcher.store import DatabaseURLError, open_store
from executor_service.dispatcher.store.base import (
    Claim,
    Execution,
    Failover,
    IdempotencyConflict,
    JobQuery,
    NewJob,
    RegionSpec,
    RetryRequest,
    State,
    Store,
    StoreError,
)

T0 = 1_000.0
LEASE_S = 30.0
R1 = RegionSpec("r1", concurrency=100, models=frozenset({"m1", "m2"}))
R2 = RegionSpec("r2", concurrency=100, models=frozenset({"m1", "m2"}))


@pytest.fixture(scope="session")
def postgres_databases() -> Iterator[PostgresDatabases]:
    databases = PostgresDatabases()
    yield databases
    databases.close()


@pytest.fixture(params=["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of a fresh database of each kind (migrated when opened)."""
    if request.param == "memory":
        yield "memory://"
        return
    if request.param == "sqlite":
        yield sqlite_url(tmp_path)
        return
    databases: PostgresDatabases = request.getfixturevalue("postgres_databases")
    url = databases.create()
    yield url
    databases.drop(url)


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    """A fresh, migrated store of each kind."""
    store = open_store(store_url)
    yield store
    store.close()


def make_job(
    tenant: str = "acme",
    questions: int = 2,
    models: tuple[str, ...] = ("m1",),
    regions: tuple[str, ...] = ("r1",),
    **kwargs: object,
) -> NewJob:
    return NewJob(
        tenant=tenant,
        questions=[f"{tenant} question {i}" for i in range(questions)],
        models=list(models),
        regions_by_model={m: list(regions) for m in models},
        **kwargs,  # type: ignore[arg-type]
    )


def claim(
    store: Store,
    region: RegionSpec = R1,
    limit: int = 100,
    now: float = T0,
    tenant_batch: int = 1_000,
    retry_handoff_s: float = DEFAULT_RETRY_HANDOFF_S,
) -> list[Claim]:
    return store.claim(
        ClaimRequest(region, limit, now, LEASE_S, "worker-1", tenant_batch, retry_handoff_s)
    )


def execution(store: Store, job_id: str, execution_id: int) -> Execution:
    return next(e for e in store.executions(job_id) if e.id == execution_id)


def fail_in(store: Store, region: RegionSpec, job_id: str, now: float, due: float) -> Claim:
    """Claim the job's next execution in ``region`` and fail it, to be retried at ``due``;
    anything else the claim took is released untouched."""
    claims = claim(store, region, now=now)
    mine = next(c for c in claims if c.job_id == job_id)
    for other in claims:
        if other is not mine:
            assert store.release(other.execution_id, other.token, now)
    assert store.fail(mine.execution_id, mine.token, {"code": "provider_error"}, now, now, due)
    return mine


# -- jobs -------------------------------------------------------------------------


def test_a_job_expands_into_one_execution_per_question_model_and_region(store: Store) -> None:
    new = NewJob(
        tenant="acme",
        questions=["a?", "b?", "c?"],
        models=["m1", "m2"],
        regions_by_model={"m1": ["r1", "r2"], "m2": ["r2"]},
        params={"max_tokens": 16},
    )
    job, created = store.create_job(new, T0)

    assert created and job.total == 9 and job.tenant == "acme" and not job.cancelled
    assert store.get_job("acme", job.id) == job
    assert store.job_counts(job.id) == {"r1": {"queued": 3}, "r2": {"queued": 6}}
    listed = [
        (e.question_index, e.question, e.model, e.requested_region, e.state, e.attempts)
        for e in store.executions(job.id)
    ]
    assert listed == [
        (q, text, model, region, State.QUEUED, 0)
        for q, text in enumerate(["a?", "b?", "c?"])
        for model, region in [("m1", "r1"), ("m1", "r2"), ("m2", "r2")]
    ]
    assert not store.job_finished(job.id)


def test_the_same_idempotency_key_and_body_returns_the_same_job(store: Store) -> None:
    job, created = store.create_job(make_job(idempotency_key="k1", request_hash="h1"), T0)
    again, created_again = store.create_job(make_job(idempotency_key="k1", request_hash="h1"), T0)

    assert created and not created_again
    assert again.id == job.id
    assert store.job_counts(job.id) == {"r1": {"queued": 2}}  # no duplicate executions


def test_the_same_idempotency_key_with_another_body_is_a_conflict(store: Store) -> None:
    store.create_job(make_job(idempotency_key="k1", request_hash="h1"), T0)

    with pytest.raises(IdempotencyConflict):
        store.create_job(make_job(idempotency_key="k1", request_hash="h2"), T0)
    other, created = store.create_job(
        make_job(tenant="globex", idempotency_key="k1", request_hash="h2"), T0
    )
    assert created and other.tenant == "globex"  # keys are per tenant


def test_another_tenant_can_neither_see_nor_cancel_the_job(store: Store) -> None:
    job, _ = store.create_job(make_job(tenant="acme"), T0)

    assert store.get_job("globex", job.id) is None
    assert store.cancel_job("globex", job.id, T0) == 0
    assert store.job_counts(job.id) == {"r1": {"queued": 2}}
    owned = store.get_job("acme", job.id)
    assert owned is not None and not owned.cancelled
    assert store.get_job("acme", "no-such-job") is None


# -- claim order ------------------------------------------------------------------


def test_claim_takes_global_retries_then_own_retries_then_new_work(store: Store) -> None:
    elsewhere, _ = store.create_job(make_job(tenant="a", questions=1, regions=("r2",)), T0)
    here, _ = store.create_job(make_job(tenant="b", questions=1, regions=("r1",)), T0 + 1)
    fail_in(store, R2, elsewhere.id, T0 + 2, due=T0 + 5)  # r1 may take it over: global retry
    fail_in(store, R1, here.id, T0 + 3, due=T0 + 5)  # r1's own retry
    fresh, _ = store.create_job(make_job(tenant="c", questions=1, regions=("r1",)), T0 + 4)

    claims = claim(store, R1, now=T0 + 6)  # both due, and past the own retry's hand-off

    assert [(c.job_id, c.source) for c in claims] == [
        (elsewhere.id, "global_retry"),
        (here.id, "own_retry"),
        (fresh.id, "new"),
    ]
    assert [c.attempt for c in claims] == [2, 2, 1]
    assert all(c.region == "r1" and c.lease_expires_at == T0 + 6 + LEASE_S for c in claims)


def test_the_global_retry_queue_serves_the_oldest_failure_first(store: Store) -> None:
    first, _ = store.create_job(make_job(tenant="a", questions=1, regions=("r2",)), T0)
    second, _ = store.create_job(make_job(tenant="b", questions=1, regions=("r2",)), T0)
    fail_in(store, R2, second.id, T0 + 1, due=T0 + 10)
    fail_in(store, R2, first.id, T0 + 2, due=T0 + 10)

    assert [c.job_id for c in claim(store, R1, limit=1, now=T0 + 10)] == [second.id]
    assert [c.job_id for c in claim(store, R1, limit=1, now=T0 + 10)] == [first.id]


def test_failover_none_retries_only_in_the_requested_region(store: Store) -> None:
    job, _ = store.create_job(make_job(questions=1, regions=("r2",), failover=Failover.NONE), T0)
    fail_in(store, R2, job.id, T0 + 1, due=T0 + 2)

    assert store.queue_stats(T0 + 2, [R1, R2]).global_retry == 0
    assert claim(store, R1, now=T0 + 2) == []
    assert [(c.job_id, c.source) for c in claim(store, R2, now=T0 + 2)] == [(job.id, "own_retry")]


def test_a_region_never_claims_a_model_it_does_not_serve(store: Store) -> None:
    only_m1 = RegionSpec("r1", concurrency=10, models=frozenset({"m1"}))
    r3 = RegionSpec("r3", concurrency=10, models=frozenset({"m2"}))
    job, _ = store.create_job(make_job(questions=1, models=("m2",), regions=("r1", "r2")), T0)
    assert claim(store, only_m1) == []  # new work requested in r1 for a model r1 lacks

    fail_in(store, R2, job.id, T0 + 1, due=T0 + 2)
    assert claim(store, only_m1, now=T0 + 2) == []  # nor its failed-over retry
    assert [(c.model, c.source) for c in claim(store, r3, now=T0 + 2)] == [("m2", "global_retry")]


def test_retries_are_claimed_only_once_due(store: Store) -> None:
    store.create_job(make_job(questions=1, failover=Failover.NONE), T0)
    (c,) = claim(store)
    assert store.fail(c.execution_id, c.token, {"code": "http_500"}, T0 + 1, T0, T0 + 10)

    assert claim(store, now=T0 + 9.9) == []
    assert [x.execution_id for x in claim(store, now=T0 + 10)] == [c.execution_id]


def test_a_region_takes_its_own_failed_retry_back_only_after_the_hand_off(
    store: Store,
) -> None:
    """A failover-any retry that failed in r1 is r2's the moment it is due; r1 itself gets
    it back only once it has been due for the hand-off delay (so it is never stranded)."""
    job, _ = store.create_job(make_job(questions=3, regions=("r1",)), T0)
    for question in range(3):
        fail_in(store, R1, job.id, T0 + 1 + question / 10, due=T0 + 5)
    after_handoff = T0 + 5 + DEFAULT_RETRY_HANDOFF_S

    assert claim(store, R1, now=T0 + 5) == []
    assert claim(store, R1, now=after_handoff - 0.01) == []
    taken_by_r2 = claim(store, R2, limit=1, now=T0 + 5)
    assert [(c.source, c.attempt) for c in taken_by_r2] == [("global_retry", 2)]
    # the hand-off is the caller's setting: none at all gives it back at once
    assert [c.source for c in claim(store, R1, limit=1, now=T0 + 5, retry_handoff_s=0)] == [
        "own_retry"
    ]
    (back,) = claim(store, R1, now=after_handoff)
    assert (back.source, back.attempt, back.region) == ("own_retry", 2, "r1")
    assert store.queue_stats(after_handoff, [R1, R2]).global_retry == 0


def test_divert_queued_hands_a_regions_failover_any_work_to_other_regions(
    store: Store,
) -> None:
    """What a region whose circuit opens does with its queued work: failover-any work goes
    to the global retry queue (no attempt used), failover-none work waits for the region."""
    moving, _ = store.create_job(make_job(tenant="a", questions=3, regions=("r1",)), T0)
    waiting, _ = store.create_job(
        make_job(tenant="b", questions=2, regions=("r1",), failover=Failover.NONE), T0
    )
    elsewhere, _ = store.create_job(make_job(tenant="c", questions=1, regions=("r2",)), T0)
    (running,) = claim(store, R1, limit=1)  # in flight in r1: not queued, not moved
    assert running.job_id == moving.id

    assert store.divert_queued("r1", T0 + 1) == 2

    assert store.job_counts(moving.id) == {"r1": {"leased": 1, "retry_wait": 2}}
    assert store.job_counts(waiting.id) == {"r1": {"queued": 2}}
    assert store.job_counts(elsewhere.id) == {"r2": {"queued": 1}}
    for e in store.executions(moving.id):
        if e.id != running.execution_id:
            assert (e.state, e.attempts, e.attempt_log, e.due_at) == ("retry_wait", 0, [], T0 + 1)
    assert store.queue_stats(T0 + 1, [R1]).global_retry == 2
    assert store.divert_queued("r1", T0 + 2) == 0  # nothing left to move

    # r2 takes them from the global retry queue, ahead of its own new work, as first attempts
    claims = claim(store, R2, now=T0 + 1)
    assert [(c.job_id, c.source, c.attempt, c.region) for c in claims] == [
        (moving.id, "global_retry", 1, "r2"),
        (moving.id, "global_retry", 1, "r2"),
        (elsewhere.id, "new", 1, "r2"),
    ]
    # r1 (circuit half-open again, say) still finds its failover-none work queued
    assert {c.job_id for c in claim(store, R1, now=T0 + 3)} == {waiting.id}


def test_new_work_is_shared_round_robin_across_tenants(store: Store) -> None:
    store.create_job(make_job(tenant="a", questions=2_000), T0)
    store.create_job(make_job(tenant="b", questions=5), T0 + 1)

    claims = claim(store, limit=4, tenant_batch=10)

    assert [(c.tenant, c.question_index) for c in claims] == [
        ("a", 0),
        ("b", 0),
        ("a", 1),
        ("b", 1),
    ]


def test_tenants_with_fewer_executions_in_flight_go_first(store: Store) -> None:
    store.create_job(make_job(tenant="a", questions=10), T0)
    assert len(claim(store, limit=3)) == 3  # a now has 3 in flight in r1
    store.create_job(make_job(tenant="b", questions=10), T0 + 1)

    claims = claim(store, limit=3, tenant_batch=10)

    assert [c.tenant for c in claims] == ["b", "a", "b"]


def test_a_claim_takes_at_most_tenant_batch_new_executions_per_tenant(store: Store) -> None:
    store.create_job(make_job(tenant="a", questions=10), T0)
    assert len(claim(store, limit=10, tenant_batch=3)) == 3

    store.create_job(make_job(tenant="b", questions=10), T0)
    assert Counter(c.tenant for c in claim(store, limit=10, tenant_batch=2)) == {"a": 2, "b": 2}


def test_new_work_follows_priority_then_job_age_then_question_order(store: Store) -> None:
    old, _ = store.create_job(make_job(questions=2), T0)
    urgent, _ = store.create_job(make_job(questions=2, priority=5), T0 + 2)
    young, _ = store.create_job(make_job(questions=2), T0 + 1)

    claims = claim(store, limit=6)

    assert [(c.job_id, c.question_index) for c in claims] == [
        (urgent.id, 0),
        (urgent.id, 1),
        (old.id, 0),
        (old.id, 1),
        (young.id, 0),
        (young.id, 1),
    ]


# -- region concurrency -----------------------------------------------------------


def test_a_region_is_never_given_more_than_its_concurrency(store: Store) -> None:
    three = RegionSpec("r1", concurrency=3, models=frozenset({"m1"}))
    store.create_job(make_job(questions=10, regions=("r1", "r2")), T0)
    assert len(claim(store, R2, limit=5)) == 5  # leases elsewhere do not count

    first = claim(store, three, limit=10)
    assert len(first) == 3
    assert claim(store, three, limit=10) == []

    assert store.complete(first[0].execution_id, first[0].token, {"output": "x"}, T0, T0)
    assert len(claim(store, three, limit=10)) == 1
    assert store.queue_stats(T0, [three]).regions[0].in_flight == 3


# -- results and fencing ----------------------------------------------------------


def test_complete_writes_the_answer_and_the_attempt(store: Store) -> None:
    job, _ = store.create_job(make_job(questions=1, params={"max_tokens": 8}), T0)
    (c,) = claim(store)
    assert c.params == {"max_tokens": 8} and c.question == "acme question 0"
    body = {"output": "Paris", "region": "r1", "usage": {"prompt_tokens": 3}}

    assert store.complete(c.execution_id, c.token, body, T0 + 2, T0 + 1)

    e = execution(store, job.id, c.execution_id)
    assert (e.state, e.output, e.result, e.executed_region) == ("succeeded", "Paris", body, "r1")
    assert e.finished_at == T0 + 2 and e.attempts == 1
    assert [
        (a.number, a.region, a.started_at, a.finished_at, a.ok, a.error) for a in e.attempt_log
    ] == [(1, "r1", T0 + 1, T0 + 2, True, None)]
    assert store.job_finished(job.id)


def test_a_result_is_written_once(store: Store) -> None:
    job, _ = store.create_job(make_job(questions=1), T0)
    (c,) = claim(store)
    assert store.complete(c.execution_id, c.token, {"output": "first"}, T0 + 1, T0)

    assert not store.complete(c.execution_id, c.token, {"output": "second"}, T0 + 2, T0)
    assert not store.fail(c.execution_id, c.token, {"code": "x"}, T0 + 2, T0, T0 + 3)
    assert not store.release(c.execution_id, c.token, T0 + 2)
    e = execution(store, job.id, c.execution_id)
    assert (e.state, e.output, len(e.attempt_log)) == ("succeeded", "first", 1)


def test_a_stale_lease_cannot_write_after_it_was_reaped_and_reclaimed(store: Store) -> None:
    job, _ = store.create_job(make_job(questions=1), T0)
    (stale,) = claim(store)
    assert store.reap_expired(T0 + LEASE_S + 1) == 1
    (fresh,) = claim(store, now=T0 + LEASE_S + 1 + DEFAULT_RETRY_HANDOFF_S)
    assert fresh.execution_id == stale.execution_id and fresh.token != stale.token

    assert not store.complete(stale.execution_id, stale.token, {"output": "late"}, T0 + 40, T0)
    assert store.heartbeat([(stale.execution_id, stale.token)], T0 + 40, LEASE_S) == set()
    assert not store.fail(stale.execution_id, stale.token, {"code": "x"}, T0 + 40, T0, None)
    assert store.complete(fresh.execution_id, fresh.token, {"output": "ok"}, T0 + 41, T0 + 31)

    e = execution(store, job.id, fresh.execution_id)
    assert (e.state, e.output, e.attempts) == ("succeeded", "ok", 2)
    assert [(a.number, a.ok, (a.error or {}).get("code")) for a in e.attempt_log] == [
        (1, False, "lease_expired"),
        (2, True, None),
    ]


def test_heartbeat_keeps_a_lease_from_being_reaped(store: Store) -> None:
    store.create_job(make_job(questions=2), T0)
    kept, dropped = claim(store)

    held = store.heartbeat(
        [(kept.execution_id, kept.token), (dropped.execution_id, "not-the-token")], T0 + 20, LEASE_S
    )

    assert held == {kept.execution_id}
    assert store.reap_expired(T0 + 40) == 1  # only the one not extended
    assert store.reap_expired(T0 + 51) == 1


# -- failures, reaping, release ---------------------------------------------------


def test_fail_without_retry_dead_letters_with_the_last_error(store: Store) -> None:
    job, _ = store.create_job(make_job(questions=1), T0)
    (c,) = claim(store)
    error = {"code": "http_400", "message": "bad request", "status": 400}

    assert store.fail(c.execution_id, c.token, error, T0 + 1, T0, None)

    e = execution(store, job.id, c.execution_id)
    assert (e.state, e.last_error, e.finished_at) == ("dead", error, T0 + 1)
    assert [(a.ok, a.error) for a in e.attempt_log] == [(False, error)]
    assert store.queue_stats(T0 + 1, [R1]).dead == 1
    assert store.job_finished(job.id)


def test_fail_with_retry_waits_until_due(store: Store) -> None:
    job, _ = store.create_job(make_job(questions=1), T0)
    (c,) = claim(store)

    assert store.fail(c.execution_id, c.token, {"code": "http_503"}, T0 + 1, T0, T0 + 5)

    e = execution(store, job.id, c.execution_id)
    assert (e.state, e.due_at, e.last_error, e.finished_at) == (
        "retry_wait",
        T0 + 5,
        {"code": "http_503"},
        None,
    )
    assert not store.job_finished(job.id)


def test_expired_leases_are_retried_then_dead_lettered(store: Store) -> None:
    job, _ = store.create_job(make_job(questions=1, max_attempts=2), T0)
    (c,) = claim(store)
    assert store.reap_expired(T0 + LEASE_S) == 0  # expires strictly after its deadline

    assert store.reap_expired(T0 + LEASE_S + 1) == 1
    e = execution(store, job.id, c.execution_id)
    assert (e.state, e.due_at, (e.last_error or {}).get("code")) == (
        "retry_wait",
        T0 + LEASE_S + 1,
        "lease_expired",
    )

    (again,) = claim(store, now=T0 + 100)
    assert again.attempt == 2 and again.source == "own_retry"
    assert store.reap_expired(T0 + 200, max_backoff_s=5) == 1
    e = execution(store, job.id, c.execution_id)
    assert (e.state, e.attempts, e.finished_at) == ("dead", 2, T0 + 200)
    assert [a.number for a in e.attempt_log] == [1, 2]
    assert store.job_finished(job.id)


def test_release_returns_new_work_to_the_queue_without_using_an_attempt(store: Store) -> None:
    job, _ = store.create_job(make_job(questions=1), T0)
    (c,) = claim(store)

    assert store.release(c.execution_id, c.token, T0 + 1)

    e = execution(store, job.id, c.execution_id)
    assert (e.state, e.attempts, e.attempt_log, e.executed_region) == ("queued", 0, [], None)
    (again,) = claim(store, now=T0 + 2)
    assert (again.attempt, again.source) == (1, "new")


def test_release_returns_a_retry_to_the_retry_queue(store: Store) -> None:
    job, _ = store.create_job(make_job(questions=1, regions=("r2",)), T0)
    fail_in(store, R2, job.id, T0 + 1, due=T0 + 2)
    (c,) = claim(store, R1, now=T0 + 2)
    assert c.source == "global_retry"

    assert store.release(c.execution_id, c.token, T0 + 3)

    e = execution(store, job.id, c.execution_id)
    assert (e.state, e.attempts, e.due_at) == ("retry_wait", 1, T0 + 3)
    (again,) = claim(store, R1, now=T0 + 3)
    assert (again.source, again.attempt) == ("global_retry", 2)


# -- cancel, stats, circuits ------------------------------------------------------


def test_cancel_stops_waiting_work_and_lets_running_work_finish(store: Store) -> None:
    job, _ = store.create_job(make_job(questions=6), T0)
    running, retrying, failing, releasing, abandoned = claim(store, limit=5)
    assert store.fail(retrying.execution_id, retrying.token, {"code": "x"}, T0, T0, T0 + 60)

    assert store.cancel_job("acme", job.id, T0 + 1) == 2  # one queued, one retry_wait
    assert store.cancel_job("acme", job.id, T0 + 1) == 0
    assert claim(store, now=T0 + 100) == []
    assert not store.job_finished(job.id)

    # Work that was running finishes: an answer is kept, nothing is retried.
    assert store.complete(running.execution_id, running.token, {"output": "kept"}, T0 + 2, T0)
    assert store.fail(failing.execution_id, failing.token, {"code": "x"}, T0 + 2, T0, T0 + 3)
    assert store.release(releasing.execution_id, releasing.token, T0 + 2)
    assert store.reap_expired(T0 + LEASE_S + 1) == 1
    assert store.job_counts(job.id) == {"r1": {"succeeded": 1, "cancelled": 5}}
    cancelled_job = store.get_job("acme", job.id)
    assert cancelled_job is not None and cancelled_job.cancelled
    assert execution(store, job.id, running.execution_id).output == "kept"
    assert execution(store, job.id, abandoned.execution_id).finished_at == T0 + LEASE_S + 1
    assert store.job_finished(job.id)


def test_queue_stats_counts_each_queue(store: Store) -> None:
    store.create_job(make_job(tenant="a", questions=3, regions=("r1",)), T0)
    store.create_job(make_job(tenant="b", questions=2, regions=("r2",), failover=Failover.NONE), T0)
    store.create_job(make_job(tenant="c", questions=1, regions=("r2",)), T0)
    retry_here, _in_flight = claim(store, R1, limit=2)  # r1: 1 queued left
    assert store.fail(retry_here.execution_id, retry_here.token, {"code": "x"}, T0, T0, T0 + 9)
    b1, _b2, c1 = claim(store, R2, limit=3)  # r2: nothing queued left
    assert store.fail(b1.execution_id, b1.token, {"code": "x"}, T0, T0, T0 + 9)
    assert store.fail(c1.execution_id, c1.token, {"code": "x"}, T0, T0, None)
    store.set_circuit("r2", "open", T0 + 30)

    stats = store.queue_stats(T0, [R1, R2])

    assert (stats.global_retry, stats.dead) == (1, 1)  # only r1's failover-any retry
    by_region = {q.region: q for q in stats.regions}
    r1, r2 = by_region["r1"], by_region["r2"]
    assert (r1.queued, r1.retry_wait, r1.in_flight, r1.circuit, r1.circuit_open_until) == (
        1,
        1,
        1,
        "closed",
        None,
    )
    assert (r2.queued, r2.retry_wait, r2.in_flight, r2.circuit, r2.circuit_open_until) == (
        0,
        1,
        1,
        "open",
        T0 + 30,
    )


def test_circuit_state_is_kept_and_checked(store: Store) -> None:
    store.set_circuit("r1", "open", T0 + 10)
    store.set_circuit("r1", "half_open", None)
    (r1,) = store.queue_stats(T0, [R1]).regions
    assert (r1.circuit, r1.circuit_open_until) == ("half_open", None)
    with pytest.raises(ValueError, match="circuit state"):
        store.set_circuit("r1", "ajar", None)


# -- opening and migrating --------------------------------------------------------


def test_migrate_twice_changes_nothing(store: Store) -> None:
    job, _ = store.create_job(make_job(), T0)
    store.migrate()
    assert store.job_counts(job.id) == {"r1": {"queued": 2}}


def test_open_store_rejects_an_unknown_scheme() -> None:
    with pytest.raises(DatabaseURLError, match="'mysql'"):
        open_store("mysql://user:secret@host/db")
    with pytest.raises(DatabaseURLError):
        open_store("sqlite://relative-without-third-slash.db")


def test_open_store_opens_sqlite_in_memory_and_on_a_relative_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    memory = open_store("sqlite:///:memory:")
    job, _ = memory.create_job(make_job(), T0)
    assert memory.job_counts(job.id) == {"r1": {"queued": 2}}
    memory.close()
    monkeypatch.chdir(tmp_path)
    on_disk = open_store("sqlite:///data/dispatcher.db")
    on_disk.close()
    assert (tmp_path / "data" / "dispatcher.db").exists()


def test_driver_errors_become_store_errors(tmp_path: Path) -> None:
    (tmp_path / "a-directory.db").mkdir()
    with pytest.raises(StoreError, match="SQLite"):
        open_store(f"sqlite:///{tmp_path / 'a-directory.db'}")


@pytest.mark.postgres
def test_an_unreachable_postgres_is_a_store_error() -> None:
    with pytest.raises(StoreError, match="cannot connect"):
        open_store("postgresql://postgres@127.0.0.1:1/nowhere?connect_timeout=2")


# -- concurrency ------------------------------------------------------------------


def test_concurrent_claimers_respect_the_limit_and_never_share_an_execution(
    store_url: str,
) -> None:
    """Three store instances (three "dispatcher processes", each its own connection
    or pool), each with a thread per region, drain a 300-execution job through two
    regions of concurrency 4 and 3. The first attempt of every 7th question fails
    and may be retried by either region, so the regions also race for retries."""
    regions = [
        RegionSpec("r1", concurrency=4, models=frozenset({"m1"})),
        RegionSpec("r2", concurrency=3, models=frozenset({"m1"})),
    ]
    if store_url == "memory://":  # one process: three threads share the one store
        stores = [open_store(store_url)] * 3
    else:
        stores = [open_store(store_url) for _ in range(3)]
    job, _ = stores[0].create_job(make_job(questions=150, regions=("r1", "r2")), T0)
    claimed: list[tuple[int, int]] = []  # (execution id, attempt) of every claim made
    problems: list[str] = []
    lock = threading.Lock()

    def work(store: Store, region: RegionSpec, name: str) -> None:
        try:
            while not store.job_finished(job.id):
                claims = store.claim(ClaimRequest(region, 2, T0, 3_600.0, name, 10))
                for queue in store.queue_stats(T0, regions).regions:
                    limit = next(r.concurrency for r in regions if r.name == queue.region)
                    if queue.in_flight > limit:
                        problems.append(f"{queue.in_flight} in flight in {queue.region}")
                with lock:
                    claimed.extend((c.execution_id, c.attempt) for c in claims)
                for c in claims:
                    if c.question_index % 7 == 0 and c.attempt == 1:
                        ok = store.fail(c.execution_id, c.token, {"code": "x"}, T0, T0, T0)
                    else:
                        ok = store.complete(c.execution_id, c.token, {"output": name}, T0, T0)
                    if not ok:
                        problems.append(f"{name} lost the lease of {c.execution_id}")
        except Exception as exc:  # reported below: a thread's exception is otherwise lost
            problems.append(f"{name}: {exc!r}")

    threads = [
        threading.Thread(target=work, args=(s, r, f"store{i}-{r.name}"))
        for i, s in enumerate(stores)
        for r in regions
    ]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        for s in stores[1:]:
            if s is not stores[0]:
                s.close()
    assert problems == []
    retried = 2 * 22  # question indexes 0, 7, ..., 147 in each region
    assert len(claimed) == len(set(claimed)) == 300 + retried
    executions = stores[0].executions(job.id)
    stores[0].close()
    assert {e.state for e in executions} == {State.SUCCEEDED}
    for e in executions:
        assert [a.ok for a in e.attempt_log].count(True) == 1
        assert e.attempts == len(e.attempt_log) == (2 if e.question_index % 7 == 0 else 1)


# -- scale ------------------------------------------------------------------------


@pytest.mark.slow
def test_claim_stays_correct_with_100_000_executions_queued(store: Store) -> None:
    big, _ = store.create_job(make_job(tenant="big", questions=100_000), T0)
    store.create_job(make_job(tenant="small", questions=5), T0 + 1)
    assert big.total == 100_000

    claims = claim(store, limit=4, tenant_batch=2)

    assert [(c.tenant, c.question_index) for c in claims] == [
        ("big", 0),
        ("small", 0),
        ("big", 1),
        ("small", 1),
    ]
    stats = store.queue_stats(T0, [R1])
    assert (stats.regions[0].queued, stats.regions[0].in_flight) == (100_001, 4)


# -- pacing and deadlines (issue 9) ------------------------------------------------


def paced_claim(store: Store, now: float = T0, **request: object) -> list[Claim]:
    return store.claim(ClaimRequest(R1, 100, now, LEASE_S, "worker-1", 1_000, **request))  # type: ignore[arg-type]


def test_a_deferral_is_logged_but_never_an_attempt(store: Store) -> None:
    job, _ = store.create_job(make_job(questions=1, max_attempts=1), T0)
    (c,) = claim(store)
    refused = {"code": "rate_limited", "deferred": True, "wait_s": 2.0}
    assert store.defer(c.execution_id, c.token, refused, T0 + 1, T0, T0 + 3)
    e = execution(store, job.id, c.execution_id)
    assert (e.state, e.attempts, e.deferrals, e.due_at) == (State.RETRY_WAIT, 0, 1, T0 + 3)
    assert [a.error for a in e.attempt_log] == [refused]
    # max_attempts 1 is still whole: the next call is attempt 1, call 2 (after the hand-off)
    (again,) = claim(store, now=T0 + 4)
    assert (again.attempt, again.call) == (1, 2)
    assert store.complete(again.execution_id, again.token, {"output": "ok"}, T0 + 5, T0 + 4)
    e = execution(store, job.id, c.execution_id)
    assert (e.state, e.attempts, e.deferrals) == (State.SUCCEEDED, 1, 1)
    assert [a.number for a in e.attempt_log] == [1, 2]


def test_not_before_holds_one_model_back_and_not_the_others(store: Store) -> None:
    store.create_job(make_job(questions=3, models=("m1", "m2")), T0)
    store.update_pace(
        "r1", "m1", 100, lambda p: pacing.after_deferral(p, T0, wait_s=5.0, call_started_at=T0)
    )
    claims = paced_claim(store)
    assert {c.model for c in claims} == {"m2"}
    held = getattr(claims, "held", {})
    assert held["m1"].reason == "rate_limited" and held["m1"].until == T0 + 5
    assert {c.model for c in paced_claim(store, now=T0 + 5)} == {"m1"}
    # AIMD halved m1 to 50 of 100; m2 is untouched
    paces = {p.model: p for p in store.paces(["r1"])}
    assert (paces["m1"].limit, paces["m1"].deferrals) == (50, 1)


def test_the_rpm_budget_is_one_bucket_for_every_claimer(store_url: str) -> None:
    stores = [open_store(store_url) for _ in range(2)]
    try:
        stores[0].create_job(make_job(questions=50), T0)
        budgets = {"m1": Budget(rpm=60, window_s=60.0)}  # burst 1, then 59/60 per second
        got = [len(paced_claim(s, now=T0, budgets=budgets)) for s in stores]
        assert sorted(got) == [0, 1]  # the first claimer takes the one call, not each
        later = [len(paced_claim(s, now=T0 + 10.0, budgets=budgets)) for s in stores]
        assert sum(later) == 1  # a bucket of one call refilled: one more, fleet-wide
    finally:
        for s in stores:
            s.close()


def test_the_tpm_budget_reserves_estimated_tokens_and_settles_real_usage(store: Store) -> None:
    store.create_job(make_job(questions=5, params={"max_tokens": 100}), T0)
    budgets = {"m1": Budget(tpm=6000, window_s=60.0)}  # burst 100 tokens
    (c,) = paced_claim(store, budgets=budgets)
    assert c.reserved_tokens == pacing.estimate_tokens(len(c.question), 100)
    # the bucket is in debt: 0.2 s of refill (~98 tokens/s) would not fill it again
    assert paced_claim(store, budgets=budgets) == []
    used = 10
    pace = store.update_pace(
        "r1", "m1", 100, lambda p: pacing.settle(p, budgets["m1"], c.reserved_tokens, used, T0)
    )
    assert pace.tokens == pytest.approx(100 - used)  # the unused reservation came back
    assert len(paced_claim(store, now=T0 + 0.2, budgets=budgets)) == 1


def test_a_model_whose_circuit_is_open_is_held_back_alone(store: Store) -> None:
    store.create_job(make_job(questions=2, models=("m1", "m2")), T0)
    claims = paced_claim(store, circuit_caps={"m1": 0, "m2": 100})
    assert {c.model for c in claims} == {"m2"}
    assert getattr(claims, "held", {})["m1"].reason == "circuit_open"


def test_a_jobs_deadline_ends_what_is_left_of_it(store: Store) -> None:
    job, _ = store.create_job(make_job(questions=3, deadline_s=60.0), T0)
    assert job.deadline_at == T0 + 60
    running, waiting, _ = claim(store, limit=3)
    assert store.defer(
        waiting.execution_id, waiting.token, {"code": "rate_limited"}, T0, T0, T0 + 1
    )
    assert store.expire_deadlines(T0 + 59) == 0
    assert store.expire_deadlines(T0 + 60) == 1  # the deferred one; the others are leased
    assert store.expire_deadlines(T0 + 61) == 0  # each job once
    e = execution(store, job.id, waiting.execution_id)
    assert e.state is State.DEAD and e.last_error is not None
    assert e.last_error["code"] == "deadline_exceeded"
    assert e.last_error["last"] == {"code": "rate_limited"}
    assert store.complete(running.execution_id, running.token, {"output": "x"}, T0 + 62, T0)


# -- the workbench: samples and messages, listing, retry, pages --------------------


def kill(store: Store, region: RegionSpec, now: float) -> list[int]:
    """Claim everything ``region`` can and dead-letter it; return the ids."""
    claims = claim(store, region, now=now)
    for c in claims:
        error = {"code": "connection_error", "message": "down"}
        assert store.fail(c.execution_id, c.token, error, now, now, None)
    return [c.execution_id for c in claims]


def test_samples_and_messages_expand_into_numbered_executions(store: Store) -> None:
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q0?"}]
    new = make_job(
        questions=2,
        regions=("r1", "r2"),
        samples=3,
        messages=[chat, None],
        name="probe",
        tags=["eval", "v2"],
    )
    job, _ = store.create_job(new, T0)

    assert job.total == 2 * 2 * 3 and job.samples == 3
    assert (job.name, job.tags) == ("probe", ["eval", "v2"])
    listed = [(e.question_index, e.requested_region, e.sample) for e in store.executions(job.id)]
    assert listed == [(q, r, s) for q in (0, 1) for r in ("r1", "r2") for s in range(3)]
    by_question = {e.question_index: e.messages for e in store.executions(job.id)}
    assert by_question == {0: chat, 1: None}
    c = next(c for c in claim(store) if c.question_index == 0)
    assert c.messages == chat and c.sample in range(3)


def test_executions_page_by_key_with_their_attempts(store: Store) -> None:
    job, _ = store.create_job(make_job(questions=5, models=("m2", "m1")), T0)
    (first, *_) = claim(store, limit=1)
    assert store.fail(first.execution_id, first.token, {"code": "x"}, T0, T0, T0 + 1)
    everything = store.executions(job.id)
    pages = [store.executions(job.id, limit=4)]
    while len(pages[-1]) == 4:
        pages.append(store.executions(job.id, after=pages[-1][-1].key, limit=4))

    assert [len(p) for p in pages] == [4, 4, 2]
    assert [e.id for p in pages for e in p] == [e.id for e in everything]
    assert [e.key for e in everything] == sorted(e.key for e in everything)
    assert everything[0].model == "m1"  # the order is the key's, not the job's model order
    with_log = next(e for p in pages for e in p if e.id == first.execution_id)
    assert with_log.attempt_log and with_log.attempt_log == next(
        e.attempt_log for e in everything if e.id == first.execution_id
    )
    assert store.executions(job.id, after=everything[-1].key, limit=4) == []
    assert [e.id for e in store.executions(job.id, after=everything[3].key)] == [
        e.id for e in everything[4:]
    ]


def test_a_circuit_keeps_when_it_opened_and_why(store: Store) -> None:
    error = {"code": "connection_error", "message": "cannot reach r1: Connection refused"}
    store.update_pace(
        "r1",
        "m1",
        4,
        lambda p: replace(
            p, circuit="open", circuit_open_until=T0 + 30, circuit_since=T0, circuit_error=error
        ),
    )
    (pace,) = store.paces(["r1"])
    assert (pace.circuit, pace.circuit_since, pace.circuit_error) == ("open", T0, error)
    store.update_pace("r1", "m1", 4, lambda p: pacing.after_success(p))  # another write
    (pace,) = store.paces(["r1"])
    assert pace.circuit_error == error and pace.circuit_open_until == T0 + 30
    closed = {"circuit": "closed", "circuit_since": None, "circuit_error": None}
    store.update_pace("r1", "m1", 4, lambda p: replace(p, **closed))  # type: ignore[arg-type]
    (pace,) = store.paces(["r1"])
    assert (pace.circuit, pace.circuit_since, pace.circuit_error) == ("closed", None, None)


def test_list_jobs_newest_first_by_page_state_and_name(store: Store) -> None:
    a, _ = store.create_job(make_job(name="Bias probe EU"), T0)
    b, _ = store.create_job(make_job(name="censorship"), T0 + 1)
    c, _ = store.create_job(make_job(questions=1, regions=("r2",)), T0 + 2)
    store.create_job(make_job(tenant="other", name="bias"), T0 + 3)
    kill(store, R2, T0 + 3)  # c: finished (dead)
    claim(store, limit=1)  # a: running
    store.cancel_job("acme", b.id, T0 + 4)  # b: cancelled

    def ids(**kw: object) -> list[str]:
        return [j.id for j in store.list_jobs(JobQuery("acme", limit=10, **kw))]  # type: ignore[arg-type]

    assert ids() == [c.id, b.id, a.id]
    first = store.list_jobs(JobQuery("acme", limit=2))
    rest = store.list_jobs(JobQuery("acme", limit=2, after=(first[-1].created_at, first[-1].id)))
    assert [j.id for j in first + rest] == [c.id, b.id, a.id]
    assert ids(state="running") == [a.id]
    assert ids(state="finished") == [c.id]
    assert ids(state="cancelled") == [b.id]
    assert ids(state="queued") == []
    assert ids(name="BIAS") == [a.id]


def test_retry_requeues_dead_work_in_its_region_with_attempts_starting_over(
    store: Store,
) -> None:
    job, _ = store.create_job(make_job(questions=2, regions=("r1", "r2"), max_attempts=2), T0)
    kill(store, R2, T0)
    dead = [e for e in store.executions(job.id) if e.state == State.DEAD]
    assert len(dead) == 2 and store.job_finished(job.id) is False

    assert store.retry_job(RetryRequest("other", job.id, T0 + 1)) == 0
    assert store.retry_job(RetryRequest("acme", job.id, T0 + 1, regions=("r1",))) == 0
    assert store.retry_job(RetryRequest("acme", job.id, T0 + 1)) == 2

    again = [e for e in store.executions(job.id) if e.requested_region == "r2"]
    assert {e.state for e in again} == {State.QUEUED}
    assert all(e.attempts - e.attempt_base == 0 and e.last_error is None for e in again)
    assert all(len(e.attempt_log) == 1 for e in again)  # the history is kept
    # claimed again in its own region only, with a full budget of attempts
    in_r1 = claim(store, R1, now=T0 + 2)
    assert len(in_r1) == 2 and {c.requested_region for c in in_r1} == {"r1"}
    retried = claim(store, R2, now=T0 + 2)
    assert sorted(c.execution_id for c in retried) == sorted(e.id for e in again)
    assert all(c.attempt == 2 and c.max_attempts == 3 for c in retried)


def test_retry_can_take_cancelled_work_and_only_some_models(store: Store) -> None:
    job, _ = store.create_job(make_job(questions=1, models=("m1", "m2")), T0)
    store.cancel_job("acme", job.id, T0)
    assert store.retry_job(RetryRequest("acme", job.id, T0 + 1)) == 0
    assert store.get_job("acme", job.id).cancelled  # type: ignore[union-attr]

    request = RetryRequest("acme", job.id, T0 + 1, include_cancelled=True, models=("m2",))
    assert store.retry_job(request) == 1
    states = {e.model: e.state for e in store.executions(job.id)}
    assert states == {"m1": State.CANCELLED, "m2": State.QUEUED}
    assert not store.get_job("acme", job.id).cancelled  # type: ignore[union-attr]
    (c,) = claim(store, now=T0 + 2)
    assert c.model == "m2"
