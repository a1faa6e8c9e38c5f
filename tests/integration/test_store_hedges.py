"""Hedged calls and schedule-to-start in the store: the same suite on the memory store,
SQLite and PostgreSQL (the fixtures are test_store.py's)."""

from __future__ import annotations

import test_store
from test_store import LEASE_S, T0, claim, execution, make_job

from executor_service.dispatcher import rules
from executor_service.dispatcher.rules import ClaimRequest, HedgeRequest
from executor_service.dispatcher.store.base import Claim, Failover, RegionSpec, State, Store

# The suite's fixtures, by name: a fresh store of each kind.
postgres_databases, store_url, store = (
    test_store.postgres_databases,
    test_store.store_url,
    test_store.store,
)

A = RegionSpec("r1", concurrency=2, models=frozenset({"m1"}))
B = RegionSpec("r2", concurrency=1, models=frozenset({"m1"}))
WIDE = RegionSpec("r1", concurrency=10, models=frozenset({"m1"}))


def hedge(
    store: Store, first: Claim, region: RegionSpec = A, now: float = T0 + 5, budget: int = 5
) -> Claim | None:
    request = ClaimRequest(region, 1, now, LEASE_S, "hedger", 1)
    return store.hedge(HedgeRequest(request, first.execution_id, first.token, "m1", budget))


def test_a_hedge_takes_a_seat_and_the_first_answer_wins_once(store: Store) -> None:
    job, _ = store.create_job(make_job(questions=3), T0)
    (first,) = claim(store, A, limit=1)
    h = hedge(store, first)
    assert h is not None and h.hedge_of == first.token and h.region == "r1"
    assert (first.call, h.call) == (1, 2)
    assert claim(store, A, now=T0 + 6) == []  # the lease and the hedge: both seats taken

    assert store.complete_hedge(h.execution_id, h.token, {"output": "fast"}, T0 + 6, T0 + 5)
    # The first call still runs: its seat stays taken (one of two), its answer is fenced out.
    assert len(claim(store, A, now=T0 + 7)) == 1
    assert not store.complete(first.execution_id, first.token, {"output": "slow"}, T0 + 9, T0)
    assert store.end_seat(first.execution_id, first.token, {"code": "hedged"}, T0 + 9, T0)
    assert not store.end_seat(first.execution_id, first.token, {"code": "hedged"}, T0 + 9, T0)

    e = execution(store, job.id, first.execution_id)
    assert (e.state, e.output, e.executed_region, e.hedges) == (State.SUCCEEDED, "fast", "r1", 1)
    log = [(a.number, a.ok, (a.error or {}).get("code")) for a in e.attempt_log]
    assert log == [(1, False, "hedged"), (2, True, None)]


def test_the_losers_seat_is_held_until_its_call_ends(store: Store) -> None:
    store.create_job(make_job(questions=4), T0)
    first, second = claim(store, A, limit=2)
    assert store.complete(second.execution_id, second.token, {"output": "x"}, T0 + 1, T0)
    h = hedge(store, first, B)  # failover any: in another region
    assert h is not None and h.region == "r2"
    assert claim(store, B, now=T0 + 6) == []  # B's only seat is the hedge's
    assert store.complete_hedge(h.execution_id, h.token, {"output": "b"}, T0 + 6, T0 + 5)
    (one,) = claim(store, A, now=T0 + 7)  # A: the loser still holds one of its two seats
    assert claim(store, A, now=T0 + 7) == []
    assert hedge(store, one, B, now=T0 + 7) is not None  # the hedge ended: B's seat is free
    assert store.end_seat(first.execution_id, first.token, {"code": "hedged"}, T0 + 8, T0)
    assert len(claim(store, A, now=T0 + 8)) == 1


def test_when_the_first_call_wins_the_hedge_is_fenced_out(store: Store) -> None:
    job, _ = store.create_job(make_job(questions=1), T0)
    (first,) = claim(store, A)
    h = hedge(store, first)
    assert h is not None
    assert store.complete(first.execution_id, first.token, {"output": "first"}, T0 + 6, T0)
    assert not store.complete_hedge(h.execution_id, h.token, {"output": "h"}, T0 + 7, T0 + 5)
    assert store.end_seat(h.execution_id, h.token, {"code": "hedge_lost"}, T0 + 7, T0 + 5)
    e = execution(store, job.id, first.execution_id)
    assert (e.output, e.state) == ("first", State.SUCCEEDED)
    assert [(a.number, a.ok) for a in e.attempt_log] == [(1, True), (2, False)]
    assert len(claim(store, A, now=T0 + 8)) == 0  # nothing left, every seat free


def test_one_hedge_per_lease_within_the_jobs_budget_and_numbers_stay_unique(
    store: Store,
) -> None:
    job, _ = store.create_job(make_job(questions=2, max_attempts=3), T0)
    first, other = claim(store, WIDE)
    assert hedge(store, first, WIDE, budget=0) is None  # no budget
    h = hedge(store, first, WIDE, budget=1)
    assert h is not None
    assert hedge(store, first, WIDE, budget=5) is None  # this lease is hedged already
    assert hedge(store, other, WIDE, budget=1) is None  # the job's budget is spent
    assert store.end_seat(h.execution_id, h.token, {"code": "hedge_failed"}, T0 + 6, T0 + 5)
    err = {"code": "provider_error"}
    assert store.fail(first.execution_id, first.token, err, T0 + 7, T0, T0 + 7)
    retry = next(c for c in claim(store, WIDE, now=T0 + 8) if c.execution_id == first.execution_id)
    assert retry.call == 3
    assert store.complete(retry.execution_id, retry.token, {"output": "ok"}, T0 + 9, T0 + 8)
    e = execution(store, job.id, first.execution_id)
    assert [(a.number, a.ok) for a in e.attempt_log] == [(1, False), (2, False), (3, True)]


def test_a_stale_hedge_and_an_ended_lease_are_refused_and_seats_expire(store: Store) -> None:
    store.create_job(make_job(questions=2), T0)
    first, second = claim(store, A)
    assert store.complete(first.execution_id, first.token, {"output": "x"}, T0 + 1, T0)
    assert hedge(store, first) is None  # its lease ended
    h = hedge(store, second, B)
    assert h is not None
    assert claim(store, B, now=T0 + 6) == []
    later = h.lease_expires_at + 1
    assert store.reap_expired(later) == 1  # second's lease; and the hedge's seat is freed
    assert hedge(store, second, B, now=later) is None  # the lease it raced is gone
    (retry,) = claim(store, B, now=later)  # B's seat is free: it takes the reaped work
    assert (retry.execution_id, retry.call) == (second.execution_id, 3)


def test_schedule_to_start_lets_an_idle_region_take_stale_failover_any_work(
    store: Store,
) -> None:
    store.create_job(make_job(questions=2, failover=Failover.ANY), T0)
    store.create_job(make_job(tenant="b", questions=2, failover=Failover.NONE), T0)
    idle = RegionSpec("r2", concurrency=5, models=frozenset({"m1"}))

    def stale(now: float) -> list[Claim]:
        return store.claim(ClaimRequest(idle, 5, now, LEASE_S, "w", 20, schedule_to_start_s=30))

    assert stale(T0 + 29) == []
    taken = stale(T0 + 31)
    assert [(c.source, c.region, c.tenant) for c in taken] == [
        (rules.Source.STALE.value, "r2", "acme")
    ] * 2
    assert store.release(taken[0].execution_id, taken[0].token, T0 + 32)
    assert [c.execution_id for c in claim(store, A, now=T0 + 33, limit=1)] == [
        taken[0].execution_id
    ]  # back in its own region's queue


def test_a_full_region_gets_no_hedge(store: Store) -> None:
    store.create_job(make_job(questions=3), T0)
    first, _ = claim(store, A)  # both of A's seats
    assert hedge(store, first) is None
    assert hedge(store, first, B) is not None  # B has one free
