"""Pacing rules per (region, model): what is backpressure, how long it defers, AIMD,
and the fleet budget's buckets (no sliding window over the limit), on plain numbers."""

from __future__ import annotations

import bisect
import random

import pytest

from executor_service.dispatcher import pacing
from executor_service.dispatcher.pacing import Budget, Pace


@pytest.mark.parametrize(
    ("status", "code", "provider_status", "expected"),
    [
        (429, "rate_limited", 429, True),
        (429, "http_429", None, True),
        (502, "provider_error", 429, True),
        (503, "overloaded", None, True),
        (503, "not_ready", None, False),
        (502, "provider_error", 500, False),
        (504, "model_timeout", None, False),
        (None, "connection_error", None, False),
    ],
)
def test_what_is_backpressure(
    status: int | None, code: str, provider_status: int | None, expected: bool
) -> None:
    assert pacing.is_backpressure(status, code, provider_status) is expected


def test_the_wait_comes_from_retry_after_then_the_reset_values() -> None:
    assert pacing.deferral_wait(7.0) == 7.0
    assert pacing.deferral_wait(None, {"remaining_requests": 0, "reset_requests_s": 2.5}) == 2.5
    # a limit with requests left is not the one that refused
    reset = {"remaining_requests": 3, "reset_requests_s": 9, "remaining_tokens": 0}
    assert pacing.deferral_wait(None, {**reset, "reset_tokens_s": 4}) == 4
    assert pacing.deferral_wait(None, None) == pacing.DEFAULT_DEFERRAL_S
    assert pacing.deferral_wait(3600.0) == pacing.MAX_DEFERRAL_S


def test_aimd_halves_once_per_round_and_grows_after_a_run() -> None:
    pace = Pace.initial("r", "m", max_limit=16)
    # four calls sent together all come back 429: one cut, not four
    pace = pacing.after_deferral(pace, now=10.0, wait_s=2.0, call_started_at=9.0)
    for _ in range(3):
        pace = pacing.after_deferral(pace, now=10.1, wait_s=2.0, call_started_at=9.0)
    assert pace.limit == 8
    assert pace.not_before == pytest.approx(12.1)
    assert pace.deferrals == 4
    # a call sent after the cut that is refused again cuts again
    pace = pacing.after_deferral(pace, now=13.0, wait_s=1.0, call_started_at=12.5)
    assert pace.limit == 4
    for _ in range(3):
        pace = pacing.after_success(pace)
    assert pace.limit == 4
    pace = pacing.after_success(pace)
    assert pace.limit == 5
    for _ in range(200):
        pace = pacing.after_success(pace)
    assert pace.limit == 16  # never above the configured concurrency
    assert not pacing.needs_success_write(pace)


def test_not_before_holds_every_claim_until_it_passes() -> None:
    pace = Pace.initial("r", "m", max_limit=4)
    pace = pacing.after_deferral(pace, now=0.0, wait_s=5.0, call_started_at=0.0)
    held, _ = pacing.allowance(pace, Budget(), in_flight=0, free=4, now=4.9)
    assert held.calls == 0 and held.reason == "rate_limited" and held.until == 5.0
    allowed, _ = pacing.allowance(pace, Budget(), in_flight=0, free=4, now=5.0)
    assert allowed.calls == 2  # the halved limit


def _claim_times(budget: Budget, horizon: float, seed: int) -> list[float]:
    """Claim greedily at random poll times, and at the time the budget says it allows
    the next call (as the claim loop wakes then)."""
    rng = random.Random(seed)
    pace = Pace.initial("r", "m", max_limit=1000)
    now, sent = 0.0, []
    while now < horizon:
        allowed, pace = pacing.allowance(pace, budget, in_flight=0, free=1000, now=now)
        poll = now + rng.uniform(0.0, 0.2)
        if allowed.calls:
            n, pace = pacing.take(pace, budget, [100] * allowed.calls)
            sent += [now] * n
        elif allowed.until is not None:
            poll = min(poll, allowed.until)
        now = poll
    return sent


def max_in_window(times: list[float], window: float) -> int:
    return max(bisect.bisect_left(times, t + window) - i for i, t in enumerate(times))


@pytest.mark.parametrize("seed", range(5))
def test_no_sliding_window_holds_more_than_the_rpm(seed: int) -> None:
    budget = Budget(rpm=30, window_s=6.0)
    sent = _claim_times(budget, horizon=60.0, seed=seed)
    assert max_in_window(sent, 6.0) <= 30
    # and the budget is used, not wasted: 10 windows of 30, less the burst's share
    assert len(sent) >= 0.9 * 300


def test_tokens_pace_large_calls() -> None:
    budget = Budget(tpm=1200, window_s=6.0)  # 200 tokens/s
    pace = Pace.initial("r", "m", max_limit=100)
    sent = []
    now = 0.0
    while now < 30.0:
        allowed, pace = pacing.allowance(pace, budget, in_flight=0, free=100, now=now)
        if allowed.calls:
            n, pace = pacing.take(pace, budget, [400] * allowed.calls)
            sent += [now] * n
        now += 0.05
    # 400-token calls at ~200 tokens/s: one call every ~2 s, whatever the request budget
    assert 13 <= len(sent) <= 16
    assert max_in_window(sent, 6.0) <= 1200 // 400 + 1


def test_settle_gives_back_what_a_call_did_not_use() -> None:
    budget = Budget(tpm=6000, window_s=60.0)  # burst 100 tokens
    pace = pacing.refill(Pace.initial("r", "m", 4), budget, now=0.0)
    n, pace = pacing.take(pace, budget, [100])
    assert n == 1 and pace.tokens == pytest.approx(0.0)
    pace = pacing.settle(pace, budget, reserved=100, used=30, now=0.0)
    assert pace.tokens == pytest.approx(70.0)


def test_estimate_is_prompt_characters_over_four_plus_max_tokens() -> None:
    assert pacing.estimate_tokens(10, 100) == 103
    assert pacing.estimate_tokens(0, None) == pacing.DEFAULT_MAX_TOKENS


def test_the_follow_bars_say_why_a_models_work_waits() -> None:
    from executor_service.dispatcher.commands import waiting_detail
    from executor_service.dispatcher.pacing_view import pace_view

    pace = pacing.after_deferral(
        Pace.initial("r", "m", 8), now=100.0, wait_s=30.0, call_started_at=99.0
    )
    view = pace_view(pace, None, now=101.0)
    assert view["reason"] == "rate limited, concurrency 4 of 8"
    assert view["not_before"] == 130.0
    detail = waiting_detail({"m": view})
    assert detail.startswith("m: rate limited, concurrency 4 of 8 until ")
    assert pace_view(Pace.initial("r", "m", 8), None, now=101.0)["reason"] is None
