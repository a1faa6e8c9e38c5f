"""Backpressure is not failure, stepped one turn at a time (memory store, inline pools, a
fake clock): a 429 defers without spending an attempt or striking the circuit, slows its
(region, model) for every later claim, and leaves the region's other model alone; the
job's deadline ends what is left."""

from __future__ import annotations

from typing import Any

from executor_service.dispatcher.client import CallResult, Outcome
from executor_service.dispatcher.regions import Regions
from executor_service.dispatcher.runtime import InlinePool, ManualWakeup
from executor_service.dispatcher.scheduler import BackoffPolicy, Jitter
from executor_service.dispatcher.store.base import Failover, NewJob, State
from executor_service.dispatcher.store.memory import MemoryStore
from executor_service.dispatcher.worker import Dispatcher, WorkerConfig

T0 = 1_000.0
CONFIG = WorkerConfig(
    lease_s=30.0,
    claim_poll_s=0.05,
    circuit_threshold=1,  # one real failure opens a circuit: backpressure must not
    circuit_cooldown_s=600.0,
    retry_handoff_s=0.0,
    backoff=BackoffPolicy(1.0, 10.0, Jitter.NONE),
)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def rate_limited(wait: float) -> CallResult:
    return CallResult(
        Outcome.DEFERRED,
        error={"code": "rate_limited", "message": "slow down", "status": 429},
        retry_after_s=wait,
    )


class Caller:
    """m1 answers as ``answers`` says (default: an answer); m2 always answers."""

    def __init__(self) -> None:
        self.m1: list[CallResult] = []
        self.sent: list[tuple[str, str]] = []

    def execute(self, model: str, prompt: str, request_id: str, params: Any) -> CallResult:
        self.sent.append((model, request_id))
        if model == "m1" and self.m1:
            return self.m1.pop(0)
        return CallResult(Outcome.SUCCESS, body={"output": "ok", "usage": {}})

    def close(self) -> None:
        pass


def stepper(concurrency: int = 4) -> tuple[Dispatcher, MemoryStore, Caller, Clock]:
    store, caller, clock = MemoryStore(), Caller(), Clock()
    regions = Regions.from_mapping(
        {"regions": {"r": {"url": "http://r", "concurrency": concurrency, "models": ["m1", "m2"]}}}
    )
    dispatcher = Dispatcher(
        store,
        regions,
        CONFIG,
        clock=clock,
        client_factory=lambda _r: caller,
        worker_id="stepper",
        pool_factory=lambda _r: InlinePool(),
        wakeup_factory=lambda _c: ManualWakeup(),
    )
    return dispatcher, store, caller, clock


def submit(store: MemoryStore, n: int, models: list[str], **extra: Any) -> str:
    job, _ = store.create_job(
        NewJob(
            tenant="t",
            questions=[f"q{i}" for i in range(n)],
            models=models,
            regions_by_model={m: ["r"] for m in models},
            failover=Failover.NONE,
            max_attempts=1,
            **extra,
        ),
        T0,
    )
    return job.id


def test_a_429_defers_without_an_attempt_a_strike_or_stalling_the_other_model() -> None:
    d, store, caller, clock = stepper()
    caller.m1 = [rate_limited(5.0)]
    job = submit(store, 1, ["m1", "m2"])
    d.step()
    by_model = {e.model: e for e in store.executions(job)}
    m1 = by_model["m1"]
    assert (m1.state, m1.attempts, m1.deferrals) == (State.RETRY_WAIT, 0, 1)
    assert m1.due_at == T0 + 5.0  # failover none: it waits for its (region, model)
    assert m1.attempt_log[0].error is not None and m1.attempt_log[0].error["deferred"]
    assert by_model["m2"].state is State.SUCCEEDED
    assert store.circuits["r"][0] == "closed"  # threshold 1, and still closed
    pace = {p.model: p for p in store.paces(["r"])}["m1"]
    assert (pace.not_before, pace.limit, pace.deferrals) == (T0 + 5.0, 2, 1)

    # Until not_before, m1 is held back; then its call goes out as call 2, attempt 1.
    clock.now = T0 + 4.9
    d.step()
    assert len(caller.sent) == 2
    clock.now = T0 + 5.0
    d.step()
    assert caller.sent[-1] == ("m1", f"{job}.{m1.id}.2")
    m1 = next(e for e in store.executions(job) if e.model == "m1")
    assert (m1.state, m1.attempts, m1.deferrals) == (State.SUCCEEDED, 1, 1)
    assert [a.number for a in m1.attempt_log] == [1, 2]


def test_a_real_failure_opens_only_that_models_circuit() -> None:
    d, store, caller, clock = stepper(concurrency=1)
    caller.m1 = [CallResult(Outcome.RETRYABLE, error={"code": "connection_error"})]
    job = submit(store, 3, ["m1", "m2"])
    d.step()  # m1 q0 first (question order), fails: m1's circuit opens
    paces = {p.model: p for p in store.paces(["r"])}
    assert paces["m1"].circuit == "open" and paces["m2"].circuit == "closed"
    assert store.circuits["r"][0] == "open"  # the region shows its worst model
    for _ in range(5):
        clock.now += 1.0
        d.step()
    states = {(e.model, e.question_index): e.state for e in store.executions(job)}
    assert all(states[("m2", i)] is State.SUCCEEDED for i in range(3))  # m2 ran on
    assert states[("m1", 1)] is State.QUEUED  # m1 waits for its cool-down
    assert [m for m, _ in caller.sent].count("m1") == 1


def test_the_deadline_ends_deferred_work_dead_with_a_clear_error() -> None:
    d, store, caller, clock = stepper(concurrency=1)
    caller.m1 = [rate_limited(2.0) for _ in range(10)]
    job = submit(store, 2, ["m1"], deadline_s=3.0)
    d.step()  # call 1 of q0: deferred until T0 + 2
    clock.now = T0 + 3.0
    assert d.expire_once() == 2
    for e in store.executions(job):
        assert e.state is State.DEAD and e.attempts == 0
        assert e.last_error is not None and e.last_error["code"] == "deadline_exceeded"
    assert store.job_finished(job)
