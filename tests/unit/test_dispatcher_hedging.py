"""Hedged calls and schedule-to-start, stepped: the memory store, inline pools, a fake
clock. A straggler is simulated in one thread: its fake call runs the hedger's check and
the hedge's own call before it returns, as if they ran while it was in flight."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest
from test_dispatcher_steps import T0, Stepper, ok, regions

from executor_service.dispatcher import metrics, rules
from executor_service.dispatcher.client import CallResult
from executor_service.dispatcher.hedging import MIN_SAMPLES, HedgeConfig, LatencyStats
from executor_service.dispatcher.rules import ClaimRequest
from executor_service.dispatcher.store.base import Failover, NewJob, State
from executor_service.dispatcher.worker import WorkerConfig

HEDGING = WorkerConfig(
    lease_s=30.0,
    claim_poll_s=0.05,
    circuit_threshold=100,
    schedule_to_start_s=0,
    hedging=HedgeConfig(enabled=True, max_fraction=0.05, tail_fraction=0.1),
)


def stepper(config: WorkerConfig = HEDGING, **concurrency: int) -> Stepper:
    s = Stepper(config, regions(**concurrency))
    for region in concurrency:  # this process has seen 1 s calls: p95 = 1 s
        for _ in range(MIN_SAMPLES):
            s.dispatcher.hedger.stats.observe(region, "m", 1.0)
    return s


def job(s: Stepper, n: int, requested: list[str], failover: Failover, **params: Any) -> str:
    new = NewJob(
        tenant="t",
        questions=[f"q{i}" for i in range(n)],
        models=["m"],
        regions_by_model={"m": requested},
        failover=failover,
        max_attempts=3,
        params=params,
    )
    return s.store.create_job(new, s.clock())[0].id


def straggler(s: Stepper, prompt: str, during: Callable[[], None]) -> None:
    """The first call of ``prompt`` runs 10 s, ``during`` happening meanwhile; every
    other call answers at once."""
    calls: dict[str, int] = {}

    def behaviour(region: str, asked: str) -> CallResult:
        calls[asked] = calls.get(asked, 0) + 1
        if asked == prompt and calls[asked] == 1:
            s.clock.now += 10.0
            during()
        return ok(region, asked)

    for region in s.dispatcher.workers:
        s.behaviours[region] = behaviour


def run_job(s: Stepper, job_id: str, steps: int = 50) -> None:
    for _ in range(steps):
        s.dispatcher.step()
        if s.store.job_finished(job_id):
            return


def hedge_now(s: Stepper) -> None:
    assert s.dispatcher.hedger.check_once() == 1


def test_a_straggler_is_hedged_in_its_region_and_the_first_answer_wins(
    caplog: pytest.LogCaptureFixture,
) -> None:
    s = stepper(a=2)
    j = job(s, 20, ["a"], Failover.NONE)  # 20 executions: a budget of 1 hedge
    straggler(s, "q19", lambda: hedge_now(s))  # the last one: the job is in its tail
    lost = metrics.LOST_LEASES.labels("a")._value.get()
    with caplog.at_level(logging.INFO, logger="executor_service.dispatcher"):
        run_job(s, j)
    # the beaten call's late answer is "not used", not a lost lease
    assert metrics.LOST_LEASES.labels("a")._value.get() == lost
    messages = [r.getMessage() for r in caplog.records]
    assert "answer not used: the call's hedge answered first" in messages
    assert not any("lease lost" in m for m in messages)

    assert s.store.job_finished(j)
    by_q = {e.question: e for e in s.store.executions(j)}
    e = by_q["q19"]
    assert (e.state, e.output, e.executed_region, e.hedges) == (State.SUCCEEDED, "a:q19", "a", 1)
    # Two calls, each with its own request id; the hedge (call 2) answered first.
    assert [x for x in s.log if x.endswith(f".{e.id}.1") or x.endswith(f".{e.id}.2")] == [
        f"a:{j}.{e.id}.1",
        f"a:{j}.{e.id}.2",
    ]
    log = [(a.number, a.region, a.ok, (a.error or {}).get("code")) for a in e.attempt_log]
    assert log == [(1, "a", False, "hedged"), (2, "a", True, None)]
    assert s.store.seats == {}  # the loser's seat ended with its call
    assert s.dispatcher.hedger.won == s.dispatcher.hedger.sent == 1
    assert all(x.hedges == 0 for x in by_q.values() if x is not e)


def test_when_the_first_call_answers_first_the_hedge_is_ignored() -> None:
    s2 = stepper(a=2)
    j2 = job(s2, 20, ["a"], Failover.NONE)
    held: list[Callable[[], None]] = []
    pool = s2.dispatcher.workers["a"]

    def hedge_later() -> None:
        original = pool.submit
        pool.submit = held.append  # type: ignore[method-assign]
        hedge_now(s2)
        pool.submit = original  # type: ignore[method-assign]

    straggler(s2, "q19", hedge_later)
    run_job(s2, j2)
    assert s2.store.job_finished(j2) and len(held) == 1
    held[0]()  # the hedge answers after the first call did
    (e,) = [x for x in s2.store.executions(j2) if x.question == "q19"]
    assert (e.state, e.output) == (State.SUCCEEDED, "a:q19")
    log = [(a.number, a.ok, (a.error or {}).get("code")) for a in e.attempt_log]
    assert log == [(1, True, None), (2, False, "hedge_lost")]
    assert s2.store.seats == {}
    assert s2.dispatcher.hedger.won == 0


def test_failover_any_hedges_in_another_region_whose_seat_it_takes() -> None:
    s = stepper(a=1, b=1)
    j = job(s, 20, ["a"], Failover.ANY)
    seen: dict[str, Any] = {}

    def during() -> None:
        hedge_now(s)  # b runs the hedge at once (inline pool) and wins
        # The straggler still runs in a: a's only seat stays taken meanwhile.
        seen["seats"] = [(x.region, x.hedge_of) for x in s.store.seats.values()]
        spec = regions(a=1, b=1)["a"].spec()
        seen["claimed"] = s.store.claim(ClaimRequest(spec, 1, s.clock(), 30.0, "x", 20))

    straggler(s, "q19", during)
    run_job(s, j)
    (e,) = [x for x in s.store.executions(j) if x.question == "q19"]
    assert (e.executed_region, e.output) == ("b", "b:q19")
    assert seen["seats"] == [("a", None)] and seen["claimed"] == []
    assert [(a.region, a.ok) for a in e.attempt_log] == [("a", False), ("b", True)]
    assert s.store.seats == {}


def test_a_hedge_never_takes_a_regions_last_seat_nor_a_second_hedge() -> None:
    s = stepper(a=1)  # failover none, one seat: the straggler holds it
    j = job(s, 20, ["a"], Failover.NONE)
    straggler(s, "q19", lambda: setattr(s, "sent", s.dispatcher.hedger.check_once()))
    run_job(s, j)
    assert s.sent == 0  # type: ignore[attr-defined]
    (e,) = [x for x in s.store.executions(j) if x.question == "q19"]
    assert (e.hedges, len(e.attempt_log)) == (0, 1)

    s = stepper(a=3)
    j = job(s, 20, ["a"], Failover.NONE)

    def twice() -> None:
        hold = s.dispatcher.workers["a"].submit
        s.dispatcher.workers["a"].submit = lambda task: None  # type: ignore[method-assign]
        assert s.dispatcher.hedger.check_once() == 1
        assert s.dispatcher.hedger.check_once() == 0  # this lease is hedged already
        (seat,) = s.store.seats.values()
        s.store.end_seat(seat.execution_id, seat.token, {"code": "x"}, s.clock(), s.clock())
        assert s.dispatcher.hedger.check_once() == 0  # and the job's budget (1) is spent
        s.dispatcher.workers["a"].submit = hold  # type: ignore[method-assign]

    straggler(s, "q19", twice)
    run_job(s, j)
    assert s.store.job_finished(j)


def test_no_hedge_outside_the_tail_or_for_a_sampled_call() -> None:
    s = stepper(a=2)
    j = job(s, 20, ["a"], Failover.NONE)
    straggler(s, "q0", lambda: setattr(s, "sent", s.dispatcher.hedger.check_once()))
    run_job(s, j)  # q0 straggles while 19 are left: not the tail
    assert s.sent == 0  # type: ignore[attr-defined]

    for params, hedged in (({"temperature": 0.7}, 0), ({"temperature": 0.7, "seed": 1}, 1)):
        s = stepper(a=2)
        j = job(s, 20, ["a"], Failover.NONE, **params)
        straggler(s, "q19", lambda s=s: setattr(s, "sent", s.dispatcher.hedger.check_once()))
        run_job(s, j)
        assert s.sent == hedged  # type: ignore[attr-defined]


def test_hedging_off_sends_nothing() -> None:
    s = stepper(WorkerConfig(hedging=HedgeConfig(enabled=False)), a=2)
    j = job(s, 20, ["a"], Failover.NONE)
    straggler(s, "q19", lambda: setattr(s, "sent", s.dispatcher.hedger.check_once()))
    run_job(s, j)
    assert s.sent == 0  # type: ignore[attr-defined]


def test_hedge_rules() -> None:
    assert rules.hedgeable({}) and rules.hedgeable({"temperature": 0})
    assert not rules.hedgeable({"temperature": 0.2})
    assert rules.hedgeable({"temperature": 0.2, "seed": 0})
    assert [rules.hedge_budget(n, 0.05) for n in (10, 19, 20, 64, 100)] == [0, 0, 1, 3, 5]
    assert rules.in_tail(1, 5, 0.1) and not rules.in_tail(2, 5, 0.1)
    assert rules.in_tail(6, 64, 0.1) and not rules.in_tail(7, 64, 0.1)
    assert not rules.in_tail(0, 64, 0.1)
    assert not rules.straggling(9.0, None) and rules.straggling(1.1, 1.0)
    assert rules.hedge_regions(Failover.NONE, "a", ["a", "b"]) == ["a"]
    assert rules.hedge_regions(Failover.ANY, "b", ["a", "b", "c"]) == ["a", "c", "b"]


# -- schedule-to-start ------------------------------------------------------------------


def test_an_idle_region_takes_failover_any_work_queued_too_long_elsewhere() -> None:
    config = WorkerConfig(lease_s=30.0, schedule_to_start_s=30.0)
    s = Stepper(config, regions(a=1, b=2), deferred=True)
    j_any = job(s, 3, ["a"], Failover.ANY)
    s.clock.now = T0 + 0.01  # the younger job: a takes j_any's first execution
    j_none = job(s, 3, ["a"], Failover.NONE)

    s.dispatcher.step()  # a takes one; b serves the model but nothing is requested there
    assert s.dispatcher.workers["b"].in_flight() == 0
    s.clock.now = T0 + 29.9
    s.dispatcher.step()
    assert s.dispatcher.workers["b"].in_flight() == 0  # not queued long enough yet

    s.clock.now = T0 + 30.1
    s.dispatcher.step()  # b is idle: it takes a's oldest failover-any work, not "none"
    assert s.dispatcher.workers["b"].in_flight() == 2
    for pool in s.pools.values():
        pool.run_pending()
    regions_of = {
        (x.job_id, x.question): x.executed_region
        for j in (j_any, j_none)
        for x in s.store.executions(j)
        if x.state is State.SUCCEEDED
    }
    assert sorted(r for (jid, _), r in regions_of.items() if jid == j_any) == ["a", "b", "b"]
    assert all(r == "a" for (jid, _), r in regions_of.items() if jid == j_none)
    claimed = [x for x in s.store.rows.values() if x.executed_region == "b"]
    assert {x.claimed_from for x in claimed} == {rules.Source.STALE.value}


def test_work_taken_by_schedule_to_start_is_released_to_its_own_queue() -> None:
    assert rules.after_release(rules.Source.STALE.value, False, None, T0).state is State.QUEUED
    spec = regions(a=1, b=1)["b"].spec()
    s = Stepper(WorkerConfig(), regions(a=1, b=1))
    j = job(s, 1, ["a"], Failover.ANY)
    request = ClaimRequest(spec, 1, T0 + 31, 30.0, "w", 20, schedule_to_start_s=30.0)
    (c,) = s.store.claim(request)
    assert (c.source, c.region) == ("schedule_to_start", "b")
    assert s.store.release(c.execution_id, c.token, T0 + 32)
    (e,) = s.store.executions(j)
    assert (e.state, e.requested_region, e.attempts) == (State.QUEUED, "a", 0)
    off = ClaimRequest(spec, 1, T0 + 99, 30.0, "w", 20, schedule_to_start_s=0)
    assert s.store.claim(off) == []


def test_the_p95_is_capped_at_three_medians_so_a_heavy_tail_still_has_stragglers() -> None:
    stats = LatencyStats()
    for _ in range(19):
        stats.observe("a", "m", 0.4)
    assert stats.p95("a", "m") is None  # too few to tell
    stats.observe("a", "m", 0.5)
    assert stats.p95("a", "m") == 0.5
    for _ in range(5):  # 5 of 25 answers are 6 s stragglers: the p95 is one of them
        stats.observe("a", "m", 6.0)
    assert stats.p95("a", "m") == pytest.approx(1.2)  # 3 x the median 0.4
