"""The dispatcher runtime stepped one turn at a time: the memory store, an inline call pool,
a wake-up that never blocks and a fake clock. No threads, no sleeps: every assertion is
about the order and the count of what happened."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from executor_service.dispatcher import rules
from executor_service.dispatcher.client import CallResult, Outcome
from executor_service.dispatcher.regions import Regions
from executor_service.dispatcher.rules import ClaimRequest
from executor_service.dispatcher.runtime import InlinePool, ManualWakeup
from executor_service.dispatcher.scheduler import BackoffPolicy, Jitter
from executor_service.dispatcher.store.base import Failover, NewJob, State, StoreError
from executor_service.dispatcher.store.memory import MemoryStore
from executor_service.dispatcher.worker import (
    STORE_ERROR_PAUSE_S,
    Dispatcher,
    WorkerConfig,
    request_id_for,
)

T0 = 1_000.0
Behaviour = Callable[[str, str], CallResult]


def ok(region: str, prompt: str) -> CallResult:
    return CallResult(Outcome.SUCCESS, body={"output": f"{region}:{prompt}", "region": region})


def down(region: str, prompt: str) -> CallResult:
    return CallResult(Outcome.RETRYABLE, error={"code": "connection_error", "message": "refused"})


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Caller:
    def __init__(self, region: str, behaviours: dict[str, Behaviour], log: list[str]) -> None:
        self.region, self.behaviours, self.log = region, behaviours, log

    def execute(self, model: str, prompt: str, request_id: str, params: Any) -> CallResult:
        self.log.append(f"{self.region}:{request_id}")
        return self.behaviours.get(self.region, ok)(self.region, prompt)

    def close(self) -> None:
        pass


def regions(**concurrency: int) -> Regions:
    return Regions.from_mapping(
        {
            "regions": {
                name: {"url": f"http://{name}", "concurrency": n, "models": ["m"]}
                for name, n in concurrency.items()
            }
        }
    )


class Stepper:
    """A Dispatcher on the memory store with inline pools, manual wake-ups, a fake clock."""

    def __init__(self, config: WorkerConfig, regions: Regions, deferred: bool = False) -> None:
        self.store = MemoryStore()
        self.clock = FakeClock()
        self.behaviours: dict[str, Behaviour] = {}
        self.log: list[str] = []
        self.pools: dict[str, InlinePool] = {}
        self.wakeups: list[ManualWakeup] = []

        def pool(region: Any) -> InlinePool:
            self.pools[region.name] = InlinePool(deferred=deferred)
            return self.pools[region.name]

        def wakeup(_clock: Any) -> ManualWakeup:
            self.wakeups.append(ManualWakeup())
            return self.wakeups[-1]

        self.dispatcher = Dispatcher(
            self.store,
            regions,
            config,
            clock=self.clock,
            client_factory=lambda r: Caller(r.name, self.behaviours, self.log),
            worker_id="stepper",
            pool_factory=pool,
            wakeup_factory=wakeup,
        )

    def job(self, n: int, requested: list[str], failover: Failover, max_attempts: int) -> str:
        new = NewJob(
            tenant="t",
            questions=[f"q{i}" for i in range(n)],
            models=["m"],
            regions_by_model={"m": requested},
            failover=failover,
            max_attempts=max_attempts,
        )
        job, _ = self.store.create_job(new, self.clock())
        return job.id

    def circuit(self, region: str) -> str:
        return self.store.circuits.get(region, ("closed", None))[0]


CONFIG = WorkerConfig(
    lease_s=30.0,
    claim_poll_s=0.05,
    circuit_threshold=100,
    circuit_cooldown_s=60.0,
    retry_handoff_s=0.5,
    backoff=BackoffPolicy(1.0, 10.0, Jitter.NONE),
)


def test_claim_call_fail_backoff_retry_in_another_region_succeed() -> None:
    s = Stepper(CONFIG, regions(a=1, b=1))
    s.behaviours["a"] = down
    job = s.job(1, ["a"], Failover.ANY, max_attempts=3)

    # t0: a claims the new execution and calls; the call fails; backoff 1 s (attempt 1).
    s.dispatcher.step()
    (row,) = s.store.rows.values()
    assert s.log == [f"a:{job}.{row.id}.1"]
    assert (row.state, row.due_at, row.last_region, row.attempts) == ("retry_wait", T0 + 1, "a", 1)
    # Every region is told when the retry falls due, and when its hand-off ends.
    assert all(w.wake_times == [T0 + 1, T0 + 1.5] for w in s.wakeups)

    # Before it is due nobody takes it.
    s.clock.now = T0 + 0.99
    s.dispatcher.step()
    assert len(s.log) == 1

    # Due: a may not take its own failure back yet (hand-off), b takes it from the
    # global retry queue and succeeds.
    s.clock.now = T0 + 1
    s.dispatcher.step()
    assert s.log == [f"a:{job}.{row.id}.1", f"b:{job}.{row.id}.2"]
    (e,) = s.store.executions(job)
    assert (e.state, e.executed_region, e.attempts, e.output) == (State.SUCCEEDED, "b", 2, "b:q0")
    assert [(a.region, a.ok) for a in e.attempt_log] == [("a", False), ("b", True)]
    assert e.attempt_log[0].error == {"code": "connection_error", "message": "refused"}
    assert s.store.job_finished(job)
    assert s.dispatcher.in_flight() == 0


def test_a_failing_region_opens_its_circuit_and_stops_claiming() -> None:
    config = WorkerConfig(
        lease_s=5,
        claim_poll_s=0.05,
        circuit_threshold=2,
        circuit_cooldown_s=60,
        backoff=BackoffPolicy(0.01, 0.05, Jitter.NONE),
    )
    s = Stepper(config, regions(a=1))  # one slot: one call per step
    s.behaviours["a"] = down
    job = s.job(6, ["a"], Failover.NONE, max_attempts=10)

    s.dispatcher.step()
    s.dispatcher.step()
    assert len(s.log) == 2 and s.circuit("a") == "open"  # exactly the threshold
    for _ in range(50):  # many turns, retries due, still inside the cool-down
        s.clock.now += 1
        pause = s.dispatcher.step()["a"]
        assert pause > 0
    assert len(s.log) == 2
    assert not s.store.job_finished(job)

    s.clock.now = T0 + 61  # past the cool-down: exactly one probe
    s.dispatcher.step()
    s.dispatcher.step()
    assert len(s.log) == 3 and s.circuit("a") == "open"


def test_heartbeat_keeps_a_running_call_leased_and_the_reaper_takes_a_dead_ones() -> None:
    s = Stepper(WorkerConfig(lease_s=3.0, claim_poll_s=0.05), regions(a=2), deferred=True)
    job = s.job(1, ["a"], Failover.ANY, max_attempts=3)
    crashed = s.store.claim(ClaimRequest(regions(a=2)["a"].spec(), 1, T0, 3.0, "crashed", 20))
    assert s.dispatcher.step() and s.log == []  # nothing else to claim: the crashed one holds it

    s.clock.now = T0 + 3.5  # the crashed worker's lease has expired
    assert s.dispatcher.reap_once() == 1
    assert s.wakeups[0].woken >= 1  # a reap wakes every region
    s.dispatcher.step()
    assert s.dispatcher.in_flight() == 0  # it failed here: other regions get a head start
    s.clock.now = T0 + 3.5 + CONFIG.retry_handoff_s  # none took it: a takes it back
    s.dispatcher.step()  # claimed again: the call is pending in the deferred pool
    assert s.dispatcher.in_flight() == 1 and s.log == []

    for _ in range(3):  # a long call: each heartbeat extends the lease by 3 s
        s.clock.now += 2.0
        assert s.dispatcher.heartbeat_once() == 1
        assert s.dispatcher.reap_once() == 0
    assert s.pools["a"].run_pending() == 1

    (e,) = s.store.executions(job)
    assert (e.state, e.attempts) == (State.SUCCEEDED, 2)
    assert [a.error["code"] for a in e.attempt_log if a.error] == ["lease_expired"]
    assert not s.store.complete(e.id, crashed[0].token, {"output": "stale"}, s.clock(), T0)


def test_stop_leaves_the_seats_of_running_calls_until_their_deadline() -> None:
    """SIGTERM with calls longer than the grace: the calls still run at the executor, so
    their seats stay taken until their deadline (timeout_s 60 + margin) has passed;
    only then does a reaper give the work back, with the attempt recorded."""
    s = Stepper(CONFIG, regions(a=2), deferred=True)
    job = s.job(3, ["a"], Failover.ANY, max_attempts=3)
    s.dispatcher.step()
    assert s.dispatcher.in_flight() == 2
    assert s.dispatcher.stop(grace_s=0) == 2
    s.pools["a"].pending.clear()  # the process exits: its calls' answers never come
    other = Stepper(CONFIG, regions(a=2))
    other.store = s.store
    spec = regions(a=2)["a"].spec()

    def claim_now() -> int:
        return len(s.store.claim(ClaimRequest(spec, 2, s.clock(), 30.0, "other", 20)))

    s.clock.now = T0 + 64  # past the 30 s lease, before the calls' deadline: seats taken
    assert s.dispatcher.reap_once() == 0
    assert claim_now() == 0
    s.clock.now = T0 + rules.seat_lease_s(30.0, 60.0) + 0.1
    assert s.dispatcher.reap_once() == 2
    leased = [e for e in s.store.executions(job) if e.attempt_log]
    assert [[a.error["code"] for a in e.attempt_log] for e in leased] == [["lease_expired"]] * 2


def test_a_crashed_workers_seat_is_free_only_after_its_call_deadline() -> None:
    s = Stepper(CONFIG, regions(a=1), deferred=True)
    s.job(2, ["a"], Failover.ANY, max_attempts=3)
    s.dispatcher.step()  # the call is sent; then the process dies (no heartbeat, no answer)
    s.pools["a"].pending.clear()
    spec = regions(a=1)["a"].spec()
    survivor = Dispatcher(
        s.store, regions(a=1), CONFIG, clock=s.clock, client_factory=lambda r: None
    )  # type: ignore[arg-type, return-value]
    for now in (T0 + 31, T0 + 50, T0 + 64):  # lease_s passed; the call may still run
        s.clock.now = now
        assert survivor.reap_once() == 0
        assert s.store.claim(ClaimRequest(spec, 1, now, 30.0, "survivor", 20)) == []
    s.clock.now = T0 + 65.1
    assert survivor.reap_once() == 1
    survivor.stop(grace_s=0)


class BrokenStore(MemoryStore):
    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error

    def claim(self, request: ClaimRequest) -> list[Any]:
        raise self.error


def test_a_store_error_pauses_the_claim_loop_and_a_bug_crashes_it() -> None:
    regs = regions(a=1)
    outage = Dispatcher(
        BrokenStore(StoreError("down")), regs, CONFIG, client_factory=lambda r: None
    )  # type: ignore[arg-type, return-value]
    assert outage.step() == {"a": STORE_ERROR_PAUSE_S}
    bug = Dispatcher(BrokenStore(KeyError("oops")), regs, CONFIG, client_factory=lambda r: None)  # type: ignore[arg-type, return-value]
    with pytest.raises(KeyError):
        bug.step()
    for d in (outage, bug):
        d.stop(grace_s=0)


def test_request_ids_name_job_execution_and_attempt() -> None:
    s = Stepper(CONFIG, regions(a=1))
    job = s.job(1, ["a"], Failover.ANY, max_attempts=3)
    (claim,) = s.store.claim(ClaimRequest(regions(a=1)["a"].spec(), 1, T0, 5, "w", 20))
    assert request_id_for(claim) == f"{job}.{claim.execution_id}.1"
