"""Backoff, dead-lettering and the circuit breaker, driven by a fake clock."""

from __future__ import annotations

import random
from typing import cast

import pytest

from executor_service.dispatcher.circuit import RegionCircuit
from executor_service.dispatcher.scheduler import (
    RETRY_AFTER_CAP_S,
    BackoffPolicy,
    CallVerdict,
    CircuitBreaker,
    CircuitChange,
    CircuitState,
    GiveUp,
    Jitter,
    RetryScheduler,
)
from executor_service.dispatcher.store.base import Store


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_ceiling_doubles_and_is_capped() -> None:
    policy = BackoffPolicy(base_s=0.5, max_s=3.0, jitter=Jitter.NONE)
    rng = random.Random(1)
    assert [policy.delay(n, rng) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert policy.delay(10_000, rng) == 3.0  # no overflow


@pytest.mark.parametrize("jitter", [Jitter.FULL, Jitter.EQUAL])
def test_jitter_stays_within_its_band_and_varies(jitter: Jitter) -> None:
    policy = BackoffPolicy(base_s=1.0, max_s=100.0, jitter=jitter)
    rng = random.Random(42)
    delays = [policy.delay(3, rng) for _ in range(500)]  # ceiling 4 s
    low = 0.0 if jitter is Jitter.FULL else 2.0
    assert all(low <= d <= 4.0 for d in delays)
    assert max(delays) - min(delays) > 1.0  # really randomised
    assert min(delays) < low + 0.2 and max(delays) > 3.8  # covers the band


def test_retry_after_is_a_floor_and_is_capped() -> None:
    policy = BackoffPolicy(base_s=1.0, max_s=10.0, jitter=Jitter.FULL)
    rng = random.Random(0)
    assert all(policy.delay(1, rng, retry_after_s=7.0) >= 7.0 for _ in range(50))
    assert policy.delay(1, rng, retry_after_s=10_000) == RETRY_AFTER_CAP_S
    nojitter = BackoffPolicy(base_s=5.0, max_s=10.0, jitter=Jitter.NONE)
    assert nojitter.delay(1, rng, retry_after_s=2.0) == 5.0  # a smaller Retry-After is no cap


def test_after_failure_retries_then_dead_letters() -> None:
    clock = FakeClock()
    sched = RetryScheduler(BackoffPolicy(1.0, 60.0, Jitter.NONE), clock, random.Random(0))
    first = sched.after_failure(attempt=1, max_attempts=3, retryable=True, retry_after_s=None)
    assert not first.dead and first.retry_at == clock.now + 1.0
    second = sched.after_failure(attempt=2, max_attempts=3, retryable=True, retry_after_s=5.0)
    assert second.retry_at == clock.now + 5.0 and second.delay_s == 5.0
    last = sched.after_failure(attempt=3, max_attempts=3, retryable=True, retry_after_s=None)
    assert last.dead and last.gave_up is GiveUp.MAX_ATTEMPTS
    fatal = sched.after_failure(attempt=1, max_attempts=3, retryable=False, retry_after_s=None)
    assert fatal.dead and fatal.gave_up is GiveUp.NON_RETRYABLE


def test_circuit_opens_after_threshold_consecutive_failures() -> None:
    clock = FakeClock()
    changes: list[CircuitChange] = []
    breaker = CircuitBreaker(threshold=3, cooldown_s=10.0, clock=clock, listener=changes.append)
    breaker.record(CallVerdict.UNHEALTHY)
    breaker.record(CallVerdict.UNHEALTHY)
    breaker.record(CallVerdict.HEALTHY)  # resets the run
    breaker.record(CallVerdict.UNHEALTHY)
    breaker.record(CallVerdict.NEUTRAL)  # a 4xx says nothing about the region
    breaker.record(CallVerdict.UNHEALTHY)
    assert breaker.state is CircuitState.CLOSED and breaker.allowance(4) == 4
    breaker.record(CallVerdict.UNHEALTHY)
    assert breaker.state is CircuitState.OPEN
    # since: when it opened; no error was given with these verdicts
    assert changes == [CircuitChange(CircuitState.OPEN, clock.now + 10.0, since=clock.now)]
    assert breaker.allowance(4) == 0
    assert breaker.seconds_until_probe() == 10.0


def test_half_open_allows_one_probe_that_closes_or_reopens() -> None:
    clock = FakeClock()
    changes: list[CircuitChange] = []
    breaker = CircuitBreaker(threshold=1, cooldown_s=5.0, clock=clock, listener=changes.append)
    breaker.record(CallVerdict.UNHEALTHY)
    clock.advance(4.9)
    assert breaker.allowance(3) == 0
    clock.advance(0.2)
    assert breaker.allowance(3) == 1
    assert breaker.state is CircuitState.HALF_OPEN
    breaker.probe_started()
    assert breaker.allowance(3) == 0  # one probe at a time
    breaker.record(CallVerdict.UNHEALTHY)  # probe failed: open again, a new cool-down
    assert breaker.state is CircuitState.OPEN and breaker.open_until == clock.now + 5.0
    clock.advance(5.0)
    assert breaker.allowance(3) == 1
    breaker.probe_started()
    breaker.record(CallVerdict.HEALTHY)
    assert breaker.state is CircuitState.CLOSED and breaker.allowance(3) == 3
    assert [c.state for c in changes] == [
        CircuitState.OPEN,
        CircuitState.HALF_OPEN,
        CircuitState.OPEN,
        CircuitState.HALF_OPEN,
        CircuitState.CLOSED,
    ]


class CircuitStore:
    """The two store calls a region's circuit makes, recorded."""

    def __init__(self) -> None:
        self.states: list[str] = []
        self.diverts: list[float] = []

    def set_circuit(self, region: str, state: str, open_until: float | None) -> None:
        self.states.append(state)

    def divert_queued(self, region: str, now: float) -> int:
        self.diverts.append(now)
        return 0


def test_a_region_circuit_diverts_queued_work_while_it_is_not_closed() -> None:
    """Diverted when the circuit opens (a trip or a failed probe), then again every
    cool-down while not closed (here: a probe still running); never while closed."""
    clock, store = FakeClock(1000.0), CircuitStore()
    circuit = RegionCircuit("r", cast(Store, store), threshold=2, cooldown_s=10.0, clock=clock)
    circuit.start()
    circuit.record(CallVerdict.UNHEALTHY)
    circuit.divert_if_due()
    assert store.diverts == []  # closed
    circuit.record(CallVerdict.UNHEALTHY)  # trips: open until 1010
    assert store.diverts == [1000.0]
    clock.advance(9.9)
    circuit.divert_if_due()
    assert store.diverts == [1000.0]  # not a cool-down yet
    clock.advance(0.1)
    assert circuit.allowance(4) == 1  # half-open: one probe ...
    circuit.claimed(1)
    assert circuit.allowance(4) == 0
    clock.advance(10.0)
    circuit.divert_if_due()  # ... still running a cool-down later
    assert store.diverts == [1000.0, 1020.0]
    clock.advance(1.0)
    circuit.record(CallVerdict.UNHEALTHY)  # the probe failed: open again
    assert store.diverts == [1000.0, 1020.0, 1021.0]
    clock.advance(10.0)
    assert circuit.allowance(4) == 1
    circuit.claimed(1)
    circuit.record(CallVerdict.HEALTHY)  # closed
    clock.advance(100.0)
    circuit.divert_if_due()
    assert store.diverts == [1000.0, 1020.0, 1021.0]
    assert store.states == ["closed", "open", "half_open", "open", "half_open", "closed"]
