"""Pacing rules per (region, model), free of I/O: backpressure is not failure.

A call answered 429 (the executor's ``rate_limited``, or any error whose
``provider_status`` is 429) or 503 ``overloaded`` is a *deferral*: it never counts
toward max_attempts and never strikes a circuit. What it does is slow that
(region, model) down, for every dispatcher process, through one row of state the
store keeps per (region, model) (:class:`Pace`):

- ``not_before``: no claim for that (region, model) before this time, set from the
  Retry-After or the provider's reset values;
- adaptive concurrency (AIMD): ``limit`` halves on backpressure (once per round of
  calls: a burst of 429s from calls sent together cuts it once), grows by one after
  a run of ``limit`` successes, never above the configured concurrency;
- a fleet-wide budget (:class:`Budget`, ``rpm``/``tpm`` from the regions file): a
  token bucket of requests and one of tokens, taken from in the claim transaction.

The budget's buckets hold little (a sixtieth of the limit, at least one call) and refill
at ``(limit - burst) / window``, so that *any* sliding window holds at most the
limit, not the "burst of a whole window, then the refill" a bucket of one window's
capacity allows (twice the limit in the first minute). A call whose estimated
tokens exceed the token bucket is let through when the bucket is full and leaves it
in debt, so a large call is slowed, never stranded.

The store calls these functions inside its transactions; the worker calls
:func:`classify` and :func:`deferral_wait` on each answer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

# A Retry-After longer than this is treated as this long (same cap as the backoff's).
MAX_DEFERRAL_S = 600.0
# When a deferral says nothing about how long to wait.
DEFAULT_DEFERRAL_S = 1.0
# The budget buckets hold this share of a window's limit (and at least one call):
# a second's worth of a per-minute limit. The refill is slowed by as much, so any
# sliding window holds at most the limit; the cost is this share of the throughput.
BURST_FRACTION = 1 / 60
# Prompt characters per token when estimating a call's tokens before it runs
# (OpenAI's rule of thumb; the real usage settles the difference afterwards).
CHARS_PER_TOKEN = 4
# The executor's max_tokens default, when a job does not give one.
DEFAULT_MAX_TOKENS = 256
# Float slack in bucket comparisons: a level refilled to exactly one call at the time
# the bucket said may read 0.9999999; it must count as one.
EPS = 1e-6


@dataclass(frozen=True)
class Budget:
    """A (region, model)'s limits from the regions file. ``window_s`` is the period of
    ``rpm`` and ``tpm`` (60: per minute; tests and benchmarks use a few seconds).
    ``concurrency`` caps the model's calls in flight (default: the region's)."""

    rpm: int | None = None
    tpm: int | None = None
    window_s: float = 60.0
    concurrency: int | None = None

    @property
    def limited(self) -> bool:
        return self.rpm is not None or self.tpm is not None

    def request_burst(self) -> float:
        assert self.rpm is not None
        return max(1.0, self.rpm * BURST_FRACTION)

    def request_rate(self) -> float:
        """Requests per second refilled: (rpm - burst) / window, so burst + refill over
        any window stays within rpm (half of rpm for rpm so small that burst is it)."""
        assert self.rpm is not None
        return max(self.rpm - self.request_burst(), self.rpm / 2) / self.window_s

    def token_burst(self) -> float:
        assert self.tpm is not None
        return max(1.0, self.tpm * BURST_FRACTION)

    def token_rate(self) -> float:
        assert self.tpm is not None
        return max(self.tpm - self.token_burst(), self.tpm / 2) / self.window_s


@dataclass(frozen=True)
class Pace:
    """The shared pacing state of one (region, model), as the store keeps it."""

    region: str
    model: str
    limit: int  # adaptive concurrency: calls in flight allowed now
    max_limit: int  # the configured concurrency it never exceeds
    not_before: float | None = None
    success_run: int = 0
    decreased_at: float | None = None
    requests: float | None = None  # budget bucket levels (None: full)
    tokens: float | None = None
    level_at: float | None = None
    deferrals: int = 0  # deferrals seen, for visibility
    circuit: str = "closed"
    circuit_open_until: float | None = None
    circuit_since: float | None = None  # while not closed: when it opened in this outage
    circuit_error: dict[str, Any] | None = None  # ... and the failure that opened it last

    @classmethod
    def initial(cls, region: str, model: str, max_limit: int) -> Pace:
        return cls(region, model, limit=max_limit, max_limit=max_limit)


# A change to a (region, model)'s pace, applied by the store under its row lock.
PaceChange = Callable[[Pace], Pace]


def with_max_limit(pace: Pace, max_limit: int) -> Pace:
    """The configured concurrency changed (the regions file): the limit follows it down."""
    return replace(pace, max_limit=max_limit, limit=min(pace.limit, max_limit) or max_limit)


# -- classifying answers --------------------------------------------------------
def is_backpressure(status: int | None, code: str | None, provider_status: Any) -> bool:
    """A 429 of any kind, a provider's 429 passed on, or an executor at capacity."""
    if status == 429 or provider_status == 429:
        return True
    return status == 503 and code == "overloaded"


def deferral_wait(retry_after_s: float | None, ratelimit: Mapping[str, Any] | None = None) -> float:
    """How long a deferred (region, model) waits: the Retry-After, else the provider's
    reset of its exhausted limit, else a second; never longer than MAX_DEFERRAL_S."""
    wait = retry_after_s
    if wait is None and ratelimit:
        resets = [
            float(ratelimit[f"reset_{unit}_s"])
            for unit in ("requests", "tokens")
            if isinstance(ratelimit.get(f"reset_{unit}_s"), int | float)
            and (ratelimit.get(f"remaining_{unit}") in (None, 0))
        ]
        wait = max(resets) if resets else None
    if wait is None or not math.isfinite(wait) or wait <= 0:
        wait = DEFAULT_DEFERRAL_S
    return min(wait, MAX_DEFERRAL_S)


# -- AIMD and not_before ----------------------------------------------------------
def after_deferral(pace: Pace, now: float, wait_s: float, call_started_at: float) -> Pace:
    """Backpressure: push not_before out to now + wait, and halve the limit once per
    round (a call started before the last cut was sent under the old limit: its 429
    is the same signal, not a new one)."""
    not_before = max(pace.not_before or 0.0, now + wait_s)
    cut = pace.decreased_at is None or call_started_at >= pace.decreased_at
    limit = max(1, pace.limit // 2) if cut else pace.limit
    return replace(
        pace,
        not_before=not_before,
        limit=limit,
        success_run=0,
        decreased_at=now if cut else pace.decreased_at,
        deferrals=pace.deferrals + 1,
    )


def after_success(pace: Pace) -> Pace:
    """One more success: after a run of ``limit`` of them the limit grows by one."""
    if pace.limit >= pace.max_limit:
        return pace if pace.success_run == 0 else replace(pace, success_run=0)
    run = pace.success_run + 1
    if run >= pace.limit:
        return replace(pace, limit=min(pace.max_limit, pace.limit + 1), success_run=0)
    return replace(pace, success_run=run)


def needs_success_write(pace: Pace) -> bool:
    """Whether a success changes the stored state (an unconstrained model: no write)."""
    return pace.limit < pace.max_limit or pace.success_run != 0


# -- the budget -----------------------------------------------------------------
def refill(pace: Pace, budget: Budget, now: float) -> Pace:
    """The budget buckets' levels at ``now``."""
    if not budget.limited:
        return pace
    elapsed = 0.0 if pace.level_at is None else max(0.0, now - pace.level_at)
    requests, tokens = pace.requests, pace.tokens
    if budget.rpm is not None:
        burst = budget.request_burst()
        level = burst if requests is None else requests
        requests = min(burst, level + elapsed * budget.request_rate())
    if budget.tpm is not None:
        burst = budget.token_burst()
        level = burst if tokens is None else tokens
        tokens = min(burst, level + elapsed * budget.token_rate())
    return replace(pace, requests=requests, tokens=tokens, level_at=max(now, pace.level_at or now))


def estimate_tokens(prompt_chars: int, max_tokens: int | None) -> int:
    """A call's tokens before it runs: prompt characters / 4 plus max_tokens."""
    return math.ceil(prompt_chars / CHARS_PER_TOKEN) + (max_tokens or DEFAULT_MAX_TOKENS)


@dataclass(frozen=True)
class Allowance:
    """What a (region, model) may claim now: ``calls`` at most, and the reason when it
    is held back (for the claim loop's wait and the job view)."""

    calls: int
    reason: str | None = None  # "rate_limited" | "circuit_open" | "concurrency" | "budget"
    until: float | None = None  # when it may claim again, when known


def allowance(
    pace: Pace, budget: Budget, in_flight: int, free: int, now: float
) -> tuple[Allowance, Pace]:
    """How many calls the (region, model) may claim now given ``free`` region slots,
    and its state with the buckets refilled to ``now``."""
    if pace.not_before is not None and now < pace.not_before:
        return Allowance(0, "rate_limited", pace.not_before), pace
    calls = min(free, pace.limit - in_flight)
    if calls <= 0:
        return Allowance(0, "concurrency"), pace
    pace = refill(pace, budget, now)
    if budget.rpm is not None:
        assert pace.requests is not None
        if pace.requests < 1 - EPS:
            wait = (1 - pace.requests) / budget.request_rate()
            return Allowance(0, "budget", now + wait), pace
        calls = min(calls, math.floor(pace.requests + EPS))
    if budget.tpm is not None:
        assert pace.tokens is not None
        if pace.tokens <= EPS:
            wait = (min(1.0, budget.token_burst()) - pace.tokens) / budget.token_rate()
            return Allowance(0, "budget", now + wait), pace
    return Allowance(calls), pace


def take(pace: Pace, budget: Budget, costs: Sequence[int]) -> tuple[int, Pace]:
    """Take calls of these estimated token ``costs`` (in claim order) from the refilled
    buckets; returns how many fit (a prefix) and the state after. A call fits while
    a request is left and the token bucket holds its cost, or is full (then it may
    go into debt: a call larger than the bucket is slowed, not stranded)."""
    requests, tokens = pace.requests, pace.tokens
    taken = 0
    for cost in costs:
        if budget.rpm is not None:
            assert requests is not None
            if requests < 1 - EPS:
                break
        if budget.tpm is not None:
            assert tokens is not None
            if tokens < min(cost, budget.token_burst()) - EPS:
                break
            tokens -= cost
        if budget.rpm is not None:
            assert requests is not None
            requests -= 1
        taken += 1
    return taken, replace(pace, requests=requests, tokens=tokens)


def settle(pace: Pace, budget: Budget, reserved: int, used: int, now: float) -> Pace:
    """After the call: give back the tokens reserved but not used (or take the excess)."""
    if budget.tpm is None or reserved == used:
        return pace
    pace = refill(pace, budget, now)
    assert pace.tokens is not None
    return replace(pace, tokens=min(budget.token_burst(), pace.tokens + reserved - used))
