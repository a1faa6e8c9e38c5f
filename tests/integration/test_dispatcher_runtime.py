"""The threaded dispatcher runtime (daemon pools, claim loops, heartbeat and reaper threads,
real time) on the memory store, with fake executor clients: slots, wake-ups, retries,
failover, dead letters, circuit, heartbeat, reaper and shutdown.

The same decisions, stepped one at a time with a fake clock and no threads, are in
tests/unit/test_dispatcher_steps.py; this file checks the threads wire them up right."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from support import wait_until

from executor_service.dispatcher.client import CallResult, Outcome
from executor_service.dispatcher.regions import Regions
from executor_service.dispatcher.rules import ClaimRequest
from executor_service.dispatcher.scheduler import BackoffPolicy, Jitter
from executor_service.dispatcher.store.base import Failover, NewJob, State, Store
from executor_service.dispatcher.store.memory import MemoryStore
from executor_service.dispatcher.worker import Dispatcher, WorkerConfig

Behaviour = Callable[[str, str, str], CallResult]


def ok(region: str, prompt: str, request_id: str) -> CallResult:
    return CallResult(Outcome.SUCCESS, body={"output": f"{region}:{prompt}", "region": region})


def down(region: str, prompt: str, request_id: str) -> CallResult:
    return CallResult(Outcome.RETRYABLE, error={"code": "connection_error", "message": "refused"})


class FakeCaller:
    """Counts calls and concurrency; answers with the behaviour set for its region."""

    def __init__(self, region: str, behaviours: dict[str, Behaviour], log: list[str]) -> None:
        self.region = region
        self.behaviours = behaviours
        self.log = log
        self.lock = threading.Lock()
        self.active = 0
        self.peak = 0

    def execute(self, model: str, prompt: str, request_id: str, params: Any) -> CallResult:
        with self.lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
            self.log.append(f"{self.region}:{request_id}")
        try:
            return self.behaviours.get(self.region, ok)(self.region, prompt, request_id)
        finally:
            with self.lock:
                self.active -= 1

    def close(self) -> None:
        pass


REGIONS = Regions.from_mapping(
    {
        "regions": {
            "a": {"url": "http://a", "concurrency": 2, "models": ["m"]},
            "b": {"url": "http://b", "concurrency": 2, "models": ["m"]},
        }
    }
)
FAST = WorkerConfig(
    lease_s=5.0,
    claim_poll_s=0.05,
    shutdown_grace_s=5.0,
    circuit_threshold=100,
    circuit_cooldown_s=0.2,
    backoff=BackoffPolicy(0.01, 0.05, Jitter.NONE),
)


@pytest.fixture
def store() -> Iterator[Store]:
    st = MemoryStore()
    yield st
    st.close()


class Harness:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.behaviours: dict[str, Behaviour] = {}
        self.log: list[str] = []
        self.callers: dict[str, FakeCaller] = {}
        self.dispatchers: list[Dispatcher] = []

    def factory(self, region: Any) -> FakeCaller:
        caller = FakeCaller(region.name, self.behaviours, self.log)
        self.callers[region.name] = caller
        return caller

    def dispatcher(self, config: WorkerConfig = FAST, regions: Regions = REGIONS) -> Dispatcher:
        d = Dispatcher(self.store, regions, config, client_factory=self.factory)
        self.dispatchers.append(d)
        return d

    def job(self, n: int, regions: list[str], failover: Failover = Failover.ANY, **kw: Any) -> str:
        new = NewJob(
            tenant="t",
            questions=[f"q{i}" for i in range(n)],
            models=["m"],
            regions_by_model={"m": regions},
            failover=failover,
            **kw,
        )
        job, _ = self.store.create_job(new, time.time())
        return job.id

    def finished(self, job_id: str, timeout: float = 15.0) -> list[Any]:
        wait_until(lambda: self.store.job_finished(job_id), timeout, what=f"job {job_id}")
        return self.store.executions(job_id)


@pytest.fixture
def harness(store: Store) -> Iterator[Harness]:
    h = Harness(store)
    yield h
    for d in h.dispatchers:
        d.stop(grace_s=1.0)


def test_runs_every_execution_once_within_each_regions_slots(harness: Harness) -> None:
    def slow(region: str, prompt: str, rid: str) -> CallResult:
        time.sleep(0.05)
        return ok(region, prompt, rid)

    harness.behaviours.update(a=slow, b=slow)
    job = harness.job(12, ["a", "b"])
    harness.dispatcher().start()
    executions = harness.finished(job)
    assert len(executions) == 24
    assert all(e.state is State.SUCCEEDED and e.attempts == 1 for e in executions)
    assert all(e.output == f"{e.requested_region}:{e.question}" for e in executions)
    assert len(harness.log) == 24 == len(set(harness.log))
    assert harness.callers["a"].peak == 2 and harness.callers["b"].peak == 2


def test_a_finished_call_wakes_the_claim_loop_without_waiting_for_the_poll(
    harness: Harness,
) -> None:
    # With a 30 s poll, only the wake-up on completion can run 6 calls on 1 slot in time.
    config = WorkerConfig(lease_s=60, claim_poll_s=30.0, shutdown_grace_s=1.0)
    one_slot = Regions.from_mapping(
        {"regions": {"a": {"url": "http://a", "concurrency": 1, "models": ["m"]}}}
    )
    job = harness.job(6, ["a"])
    harness.dispatcher(config, one_slot).start()
    assert len(harness.finished(job, timeout=10.0)) == 6


def test_a_retryable_failure_is_retried_with_the_error_recorded(harness: Harness) -> None:
    seen: set[str] = set()

    def flaky(region: str, prompt: str, rid: str) -> CallResult:
        if prompt not in seen:
            seen.add(prompt)
            return CallResult(
                Outcome.RETRYABLE, error={"code": "overloaded", "message": "busy", "status": 503}
            )
        return ok(region, prompt, rid)

    harness.behaviours["a"] = flaky
    job = harness.job(3, ["a"], failover=Failover.NONE)
    harness.dispatcher().start()
    for e in harness.finished(job):
        assert e.state is State.SUCCEEDED and e.attempts == 2
        first, second = e.attempt_log
        assert not first.ok and first.error["code"] == "overloaded" and first.region == "a"
        assert second.ok and second.started_at >= first.finished_at


def test_failover_any_moves_failed_work_to_a_healthy_region(harness: Harness) -> None:
    harness.behaviours["a"] = down
    # a's circuit opens after its first failure: the calls it already started fail, the
    # rest of its queued work is handed to b without being tried in a.
    config = WorkerConfig(
        lease_s=5,
        claim_poll_s=0.05,
        circuit_threshold=1,
        circuit_cooldown_s=0.5,
        backoff=BackoffPolicy(0.01, 0.05, Jitter.NONE),
    )
    job = harness.job(4, ["a"], failover=Failover.ANY, max_attempts=5)
    harness.dispatcher(config).start()
    executions = harness.finished(job)
    for e in executions:
        assert e.state is State.SUCCEEDED
        assert e.requested_region == "a" and e.executed_region == "b"
        assert e.attempt_log[-1].region == "b" and e.attempt_log[-1].ok
        assert all(a.error["code"] == "connection_error" for a in e.attempt_log[:-1])
        assert {a.region for a in e.attempt_log[:-1]} <= {"a"}
    tried_in_a = [e for e in executions if e.attempt_log[0].region == "a"]
    assert 1 <= len(tried_in_a) <= 2  # a's two slots at most, never all four


def test_a_failing_regions_retry_goes_to_the_idle_region_first(harness: Harness) -> None:
    # No circuit: only the hand-off keeps a from taking its own retries back when due.
    harness.behaviours["a"] = down
    job = harness.job(4, ["a"], failover=Failover.ANY, max_attempts=5)
    harness.dispatcher().start()
    for e in harness.finished(job):
        assert e.state is State.SUCCEEDED and e.executed_region == "b"
        assert [a.region for a in e.attempt_log] == ["a", "b"]


def test_an_open_circuit_hands_the_regions_queued_work_to_other_regions(
    harness: Harness,
) -> None:
    """a's first call fails and opens its circuit: a's queued failover-any work runs in b
    without a try in a, its failover-none work waits. Work submitted while a's half-open
    probe hangs is handed over too: the divert repeats every cool-down."""
    probe_started, release_probe = threading.Event(), threading.Event()
    calls_in_a: list[str] = []

    def failing(region: str, prompt: str, rid: str) -> CallResult:
        calls_in_a.append(rid)
        if len(calls_in_a) > 1:  # the probe after the cool-down hangs (past the waits below)
            probe_started.set()
            release_probe.wait(60)
        return down(region, prompt, rid)

    harness.behaviours["a"] = failing
    config = WorkerConfig(
        lease_s=5,
        claim_poll_s=0.05,
        circuit_threshold=1,
        circuit_cooldown_s=0.2,
        backoff=BackoffPolicy(0.01, 0.05, Jitter.NONE),
    )
    regions = Regions.from_mapping(
        {
            "regions": {
                "a": {"url": "http://a", "concurrency": 1, "models": ["m"]},
                "b": {"url": "http://b", "concurrency": 2, "models": ["m"]},
            }
        }
    )
    first = harness.job(6, ["a"], failover=Failover.ANY, max_attempts=3)
    waits = harness.job(2, ["a"], failover=Failover.NONE, max_attempts=3)
    harness.dispatcher(config, regions).start()

    executions = harness.finished(first)
    assert all(e.state is State.SUCCEEDED and e.executed_region == "b" for e in executions)
    assert sorted(len(e.attempt_log) for e in executions) == [1, 1, 1, 1, 1, 2]
    assert probe_started.wait(10)
    try:
        # a can claim nothing while its probe hangs: only a divert lets this run
        later = harness.job(5, ["a"], failover=Failover.ANY, max_attempts=3)
        executions = harness.finished(later)
        tried_in_a = list(calls_in_a)
    finally:
        release_probe.set()

    assert all(e.state is State.SUCCEEDED and e.executed_region == "b" for e in executions)
    assert all([a.region for a in e.attempt_log] == ["b"] for e in executions)
    assert len(tried_in_a) == 2  # the first failure and the probe: nothing else tried in a
    assert not any(entry.startswith("b:") and waits in entry for entry in harness.log)


def test_failover_none_dead_letters_after_max_attempts_in_its_region(harness: Harness) -> None:
    harness.behaviours["a"] = down
    job = harness.job(2, ["a"], failover=Failover.NONE, max_attempts=3)
    harness.dispatcher().start()
    for e in harness.finished(job):
        assert e.state is State.DEAD and e.attempts == 3
        assert {a.region for a in e.attempt_log} == {"a"}
        assert e.last_error["code"] == "connection_error"
        assert e.last_error["gave_up"] == "max_attempts"
    assert not any(entry.startswith("b:") for entry in harness.log)


def test_a_non_retryable_error_dead_letters_at_once(harness: Harness) -> None:
    harness.behaviours["a"] = lambda r, p, rid: CallResult(
        Outcome.FATAL, error={"code": "unknown_model", "message": "no", "status": 404}
    )
    job = harness.job(1, ["a"], failover=Failover.ANY)
    harness.dispatcher().start()
    (e,) = harness.finished(job)
    assert e.state is State.DEAD and e.attempts == 1
    assert e.last_error["gave_up"] == "non_retryable" and e.last_error["status"] == 404


def test_heartbeat_keeps_a_long_call_leased(harness: Harness) -> None:
    def long_call(region: str, prompt: str, rid: str) -> CallResult:
        time.sleep(3.0)
        return ok(region, prompt, rid)

    harness.behaviours["a"] = long_call
    # Without heartbeats the reaper (every 0.75 s) would take the 1.5 s lease away mid-call.
    config = WorkerConfig(lease_s=1.5, claim_poll_s=0.05, shutdown_grace_s=5)
    job = harness.job(1, ["a"])
    harness.dispatcher(config).start()
    (e,) = harness.finished(job, timeout=20)
    assert e.state is State.SUCCEEDED and e.attempts == 1 and len(harness.log) == 1


def test_reaper_recovers_the_lease_of_a_crashed_worker(harness: Harness) -> None:
    job = harness.job(1, ["a"])
    crashed = harness.store.claim(
        ClaimRequest(REGIONS["a"].spec(), 1, time.time(), 0.2, "crashed", 20)
    )
    assert len(crashed) == 1
    harness.dispatcher(WorkerConfig(lease_s=0.6, claim_poll_s=0.05)).start()
    (e,) = harness.finished(job)
    assert e.state is State.SUCCEEDED and e.attempts == 2
    assert e.attempt_log[0].error["code"] == "lease_expired"
    assert not harness.store.complete(e.id, crashed[0].token, {"output": "stale"}, time.time(), 0)
    assert harness.store.executions(job)[0].output != "stale"


def test_stop_lets_calls_in_flight_finish_within_the_grace(harness: Harness) -> None:
    started = threading.Event()

    def slowish(region: str, prompt: str, rid: str) -> CallResult:
        started.set()
        time.sleep(0.5)
        return ok(region, prompt, rid)

    harness.behaviours["a"] = slowish
    job = harness.job(2, ["a"])
    d = harness.dispatcher()
    d.start()
    assert started.wait(10)
    assert d.stop(grace_s=10) == 0
    done = [e for e in harness.store.executions(job) if e.state is State.SUCCEEDED]
    assert len(done) >= 1 and d.in_flight() == 0


def test_stop_leaves_the_seats_of_calls_that_outlive_the_grace(harness: Harness) -> None:
    """The calls still run at the executor: their seats stay taken (leased) until their
    deadline has surely passed, and a late answer is still recorded with its lease."""
    gate = threading.Event()

    def stuck(region: str, prompt: str, rid: str) -> CallResult:
        gate.wait(10)
        return ok(region, prompt, rid)

    harness.behaviours.update(a=stuck, b=stuck)
    job = harness.job(3, ["a"])
    d = harness.dispatcher()
    d.start()
    wait_until(lambda: len(harness.log) == 2, 10, what="two calls in flight")
    assert d.stop(grace_s=0.1) == 2
    states = sorted(e.state.value for e in harness.store.executions(job))
    assert states == ["leased", "leased", "queued"]  # the region's 2 seats are still taken
    gate.set()
    wait_until(lambda: harness.callers["a"].active == 0, 10, what="stuck calls return")
    executions = harness.store.executions(job)
    assert sorted(e.state.value for e in executions) == ["queued", "succeeded", "succeeded"]
    assert sorted(e.attempts for e in executions) == [0, 1, 1]
