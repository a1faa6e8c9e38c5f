"""Scheduling decisions, free of I/O: when to retry a failed call, when to give up,
and when a region should stop taking work (its circuit breaker).

Time comes from an injected clock and randomness from an injected
``random.Random``, so every decision here is testable without sleeping. The
worker applies the decisions through the store; the state transitions they lead
to (dead-letter, cancel finality, reap) are ``rules.py``'s.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from . import rules
from .config import DispatcherSettings

logger = logging.getLogger(__name__)

Clock = Callable[[], float]

# A Retry-After longer than this is treated as this long: a provider asking for
# an hour would otherwise park an execution past any sensible job deadline.
RETRY_AFTER_CAP_S = 600.0
# 2**30 base periods is already centuries; bounding the exponent avoids an
# OverflowError for absurd attempt numbers.
MAX_EXPONENT = 30


class Jitter(StrEnum):
    """How a backoff delay is randomised below its exponential ceiling."""

    FULL = "full"  # uniform in [0, ceiling]: spreads a burst of failures the most
    EQUAL = "equal"  # ceiling/2 + uniform in [0, ceiling/2]: never retries too eagerly
    NONE = "none"  # exactly the ceiling (tests, benchmarks)


@dataclass(frozen=True)
class BackoffPolicy:
    """Exponential backoff: ``min(max_s, base_s * 2**(attempt-1))``, jittered;
    a Retry-After from the executor is a floor."""

    base_s: float = DispatcherSettings.default("backoff_base_s")
    max_s: float = DispatcherSettings.default("backoff_max_s")
    # An enum member is immutable: a call in a dataclass default is safe here.
    jitter: Jitter = Jitter(DispatcherSettings.default("backoff_jitter"))  # noqa: RUF009

    @classmethod
    def from_settings(cls, settings: DispatcherSettings) -> BackoffPolicy:
        return cls(settings.backoff_base_s, settings.backoff_max_s, Jitter(settings.backoff_jitter))

    def ceiling(self, attempt: int) -> float:
        exponent = min(max(attempt, 1) - 1, MAX_EXPONENT)
        return min(self.max_s, self.base_s * 2**exponent)

    def delay(self, attempt: int, rng: random.Random, retry_after_s: float | None = None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        ceiling = self.ceiling(attempt)
        if self.jitter is Jitter.FULL:
            delay = rng.uniform(0.0, ceiling)
        elif self.jitter is Jitter.EQUAL:
            delay = ceiling / 2 + rng.uniform(0.0, ceiling / 2)
        else:
            delay = ceiling
        if retry_after_s is not None and retry_after_s > 0:
            delay = max(delay, min(retry_after_s, RETRY_AFTER_CAP_S))
        return delay


class GiveUp(StrEnum):
    """Why an execution is dead-lettered."""

    MAX_ATTEMPTS = "max_attempts"
    NON_RETRYABLE = "non_retryable"


@dataclass(frozen=True)
class RetryDecision:
    """``retry_at`` None means dead-letter, for ``gave_up``."""

    retry_at: float | None
    delay_s: float = 0.0
    gave_up: GiveUp | None = None

    @property
    def dead(self) -> bool:
        return self.retry_at is None


class RetryScheduler:
    """Decides what happens to an execution after a failed attempt."""

    def __init__(self, policy: BackoffPolicy, clock: Clock, rng: random.Random | None = None):
        self.policy = policy
        self.clock = clock
        self.rng = rng or random.Random()
        self._lock = threading.Lock()  # random.Random is not safe across threads

    def after_failure(
        self, attempt: int, max_attempts: int, retryable: bool, retry_after_s: float | None
    ) -> RetryDecision:
        """Dead-letter a non-retryable failure or the last allowed attempt; otherwise
        retry after the backoff for this attempt (at least ``retry_after_s``)."""
        if not retryable:
            return RetryDecision(None, gave_up=GiveUp.NON_RETRYABLE)
        if rules.exhausted(attempt, max_attempts):
            return RetryDecision(None, gave_up=GiveUp.MAX_ATTEMPTS)
        with self._lock:
            delay = self.policy.delay(attempt, self.rng, retry_after_s)
        return RetryDecision(self.clock() + delay, delay_s=delay)


class CircuitState(StrEnum):
    CLOSED = "closed"  # claiming normally
    OPEN = "open"  # not claiming until the cool-down ends
    HALF_OPEN = "half_open"  # one probe call decides: closed again, or open again


class CallVerdict(StrEnum):
    """What a finished call says about the health of its region."""

    HEALTHY = "healthy"  # an answer
    UNHEALTHY = "unhealthy"  # unreachable, timed out, overloaded, 5xx
    NEUTRAL = "neutral"  # the region answered, the request was wrong (4xx)


@dataclass(frozen=True)
class CircuitChange:
    """A breaker's new state. While not closed: ``since``, when it first opened in this
    outage (a failed probe reopens it without moving ``since``), and ``error``, the
    failure that opened it last (``{code, message}``), for the job view's "why"."""

    state: CircuitState
    open_until: float | None
    since: float | None = None
    error: dict[str, Any] | None = None


class CircuitBreaker:
    """A region's breaker: opens after ``threshold`` consecutive unhealthy calls, stays
    open for ``cooldown_s``, then lets one probe through; the probe's verdict closes it
    or opens it again. Thread-safe: calls finish on the region's pool threads."""

    def __init__(
        self,
        threshold: int,
        cooldown_s: float,
        clock: Clock,
        listener: Callable[[CircuitChange], None] | None = None,
    ) -> None:
        if threshold < 1 or cooldown_s <= 0:
            raise ValueError("threshold must be >= 1 and cooldown_s > 0")
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self.clock = clock
        self.listener = listener
        self._lock = threading.Lock()
        self._state = CircuitState.CLOSED
        self._failures = 0
        self._open_until: float | None = None
        self._since: float | None = None  # when it opened, first time in this outage
        self._error: dict[str, Any] | None = None  # the last unhealthy call's error
        self._probe_in_flight = False

    @property
    def state(self) -> CircuitState:
        with self._lock:
            return self._state

    @property
    def open_until(self) -> float | None:
        with self._lock:
            return self._open_until

    def _notify(self, change: CircuitChange | None) -> None:
        if change is not None and self.listener is not None:
            self.listener(change)

    def allowance(self, free: int) -> int:
        """How many executions the region may claim now, given ``free`` slots. An open
        circuit past its cool-down turns half-open and allows one probe. The caller
        must report the probe's verdict through ``record``."""
        change = None
        with self._lock:
            if self._state is CircuitState.OPEN:
                assert self._open_until is not None
                if self.clock() < self._open_until:
                    return 0
                self._state, self._probe_in_flight = CircuitState.HALF_OPEN, False
                change = CircuitChange(CircuitState.HALF_OPEN, None, self._since, self._error)
            if self._state is CircuitState.HALF_OPEN:
                allowed = 0 if self._probe_in_flight else min(free, 1)
            else:
                allowed = free
        self._notify(change)
        return allowed

    def probe_started(self) -> None:
        """The one claim allowed while half-open is now running."""
        with self._lock:
            if self._state is CircuitState.HALF_OPEN:
                self._probe_in_flight = True

    def seconds_until_probe(self) -> float | None:
        """While open: how long until a probe is allowed (for the claim loop's wait)."""
        with self._lock:
            if self._state is not CircuitState.OPEN or self._open_until is None:
                return None
            return max(0.0, self._open_until - self.clock())

    def record(self, verdict: CallVerdict, error: Mapping[str, Any] | None = None) -> None:
        """Count a finished call's verdict (an unhealthy one's ``error``: its code and
        message are what the job view says opened the circuit) and change state when
        it says so."""
        change = None
        with self._lock:
            if verdict is CallVerdict.HEALTHY:
                self._failures, self._since, self._error = 0, None, None
                if self._state is not CircuitState.CLOSED:
                    self._state, self._open_until = CircuitState.CLOSED, None
                    change = CircuitChange(CircuitState.CLOSED, None)
            elif verdict is CallVerdict.UNHEALTHY:
                self._failures += 1
                if error is not None:
                    self._error = {k: error[k] for k in ("code", "message") if k in error}
                reopen = self._state is CircuitState.HALF_OPEN
                trip = self._state is CircuitState.CLOSED and self._failures >= self.threshold
                if reopen or trip:
                    now = self.clock()
                    self._state, self._open_until = CircuitState.OPEN, now + self.cooldown_s
                    self._since = now if self._since is None else self._since
                    change = CircuitChange(
                        CircuitState.OPEN, self._open_until, self._since, self._error
                    )
            self._probe_in_flight = False
        self._notify(change)
