"""What a finished call does, written to the store: a success (and AIMD's increase,
the tpm budget settled to the real usage), a deferral (backpressure: logged, not an
attempt; the (region, model) waits and halves its concurrency for every process), a
failure (backoff or dead-letter), or the job's deadline (dead, ``deadline_exceeded``).

The decisions are the scheduler's, ``rules.py``'s and ``pacing.py``'s; this module
applies them for one region's worker (``worker.RegionWorker``), on its pool threads.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from . import metrics, pacing, rules
from .client import CallResult, Outcome
from .pacing import Pace
from .regions import Region
from .reuse import CallReuse
from .runtime import Wakeup
from .scheduler import Clock, RetryScheduler
from .store.base import Claim, Store, StoreError

logger = logging.getLogger(__name__)

# While the store is away, a kept result is written again this often (each try has
# already waited up to the store's connection wait).
STORE_RETRY_S = 0.25


class Recorder:
    """Records one region's call outcomes. ``paces`` keeps the last pacing state seen per
    model, so a success at full concurrency without a tpm budget writes nothing more."""

    def __init__(
        self,
        region: Region,
        store: Store,
        retries: RetryScheduler,
        clock: Clock,
        wakeup: Wakeup,
        on_retry_scheduled: Callable[[float], None],
    ) -> None:
        self.region = region
        self.store = store
        self.reuse = CallReuse(store, clock)  # jobs with params.reuse: looked up before a call
        self.retries = retries
        self.clock = clock
        self.wakeup = wakeup
        self.on_retry_scheduled = on_retry_scheduled
        self.paces: dict[str, Pace] = {}
        # whether a call was hedged (the Dispatcher sets hedging.Hedger.hedged): a hedged
        # call's write that finds its lease ended lost the race, it did not lose its lease
        self.hedged: Callable[[Claim], bool] = lambda claim: False

    def pace(self, claim: Claim, change: pacing.PaceChange) -> Pace:
        """Apply a pacing rule to the claim's (region, model) in the store."""
        model = claim.model
        pace = self.store.update_pace(
            self.region.name, model, self.region.model_concurrency(model), change
        )
        self.paces[model] = pace
        metrics.EFFECTIVE_CONCURRENCY.labels(self.region.name, model).set(pace.limit)
        metrics.NOT_BEFORE.labels(self.region.name, model).set(pace.not_before or 0.0)
        return pace

    def end_at_deadline(
        self,
        claim: Claim,
        error: dict[str, Any] | None,
        started: float,
        finished: float,
        log: dict[str, Any],
        counted: bool = False,
    ) -> bool:
        """The job's deadline has passed (or will before the next try): dead, with
        code deadline_exceeded and the error that would have been retried as "last".
        ``counted``: a real failure ended it (an attempt); a deferral, or a claim made
        as the deadline passed (no call sent), gives its attempt back."""
        final = rules.deadline_error(error)
        if counted:
            written = self.store.fail(
                claim.execution_id, claim.token, final, finished, started, None
            )
        else:
            written = self.store.defer(
                claim.execution_id, claim.token, final, finished, started, None
            )
        if written:
            metrics.DEADLINE_EXCEEDED.inc()
            metrics.DEAD_LETTERS.labels(self.region.name, rules.DEADLINE_EXCEEDED).inc()
            logger.info("job deadline passed", extra=log)
        return written

    def record_until_stored(
        self,
        claim: Claim,
        result: CallResult,
        started: float,
        finished: float,
        log: dict[str, Any],
        keep_s: float,
    ) -> None:
        """:meth:`record`, again while the store is away (StoreError), for up to ``keep_s``:
        an answer that came back during an outage is kept and written with its lease
        token, not thrown away and re-run. The claim stays in flight meanwhile, so its
        seat stays taken and the heartbeat renews its lease once the store is back."""
        give_up = time.monotonic() + keep_s
        self.reuse.count(claim, result, finished - started)  # once, however many writes
        while True:
            try:
                return self._write(claim, result, started, finished, log)
            except StoreError:
                if time.monotonic() >= give_up:
                    raise
                logger.warning("the store is away: keeping the result to write it", extra=log)
            time.sleep(STORE_RETRY_S)

    def record(
        self, claim: Claim, result: CallResult, started: float, finished: float, log: dict[str, Any]
    ) -> None:
        """Count the call (or the reuse) and write its outcome. A reused answer
        (``result.reused``, reuse.py) made no call: no AIMD step, its tokens given back."""
        self.reuse.count(claim, result, finished - started)
        self._write(claim, result, started, finished, log)

    def _write(
        self, claim: Claim, result: CallResult, started: float, finished: float, log: dict[str, Any]
    ) -> None:
        """Write the call's outcome with its lease token (no metrics: see :meth:`record`)."""
        reused = result.reused
        name = self.region.name
        budget = self.region.budget(claim.model)
        if result.ok:
            assert result.body is not None
            written = self.store.complete(
                claim.execution_id, claim.token, result.body, finished, started
            )
            if written:
                logger.info("call succeeded", extra={**log, "reused": reused})
            if not reused:
                self._after_success(claim, result.body, finished)
            elif claim.reserved_tokens and budget.tpm is not None:
                self.pace(
                    claim, lambda p: pacing.settle(p, budget, claim.reserved_tokens, 0, finished)
                )
        elif result.outcome is Outcome.DEFERRED:
            written = self._defer(claim, result, started, finished, log)
        else:
            error = dict(result.error or {"code": "unknown", "message": "no error recorded"})
            retryable = result.outcome is Outcome.RETRYABLE
            decision = self.retries.after_failure(
                claim.attempt, claim.max_attempts, retryable, result.retry_after_s
            )
            if claim.reserved_tokens and budget.tpm is not None:  # no answer: no tokens used
                self.pace(
                    claim, lambda p: pacing.settle(p, budget, claim.reserved_tokens, 0, finished)
                )
            if decision.retry_at is not None and rules.past_deadline(
                claim.deadline_at, decision.retry_at
            ):
                written = self.end_at_deadline(claim, error, started, finished, log, counted=True)
            else:
                gave_up = decision.gave_up.value if decision.gave_up else None
                if gave_up is not None:
                    error["gave_up"] = gave_up
                written = self.store.fail(
                    claim.execution_id, claim.token, error, finished, started, decision.retry_at
                )
                if written and decision.retry_at is not None:
                    metrics.RETRY_WAIT_SECONDS.labels(name).observe(decision.delay_s)
                    self.on_retry_scheduled(decision.retry_at)
                if written and gave_up is not None:
                    metrics.DEAD_LETTERS.labels(name, gave_up).inc()
                failed = {
                    "error": error.get("code"),
                    "retry_at": decision.retry_at,
                    "gave_up": gave_up,
                }
                logger.info("call failed", extra={**log, **failed})
        if not written and self.hedged(claim):
            logger.info("answer not used: the call's hedge answered first", extra=log)
        elif not written:
            metrics.LOST_LEASES.labels(name).inc()
            logger.warning("lease lost before the result was written; discarded", extra=log)

    def _after_success(self, claim: Claim, body: dict[str, Any], now: float) -> None:
        """AIMD's additive increase, and the tpm budget settled to the real usage. No
        write at all for a model at full concurrency without a tpm budget."""
        budget = self.region.budget(claim.model)
        settle = bool(claim.reserved_tokens) and budget.tpm is not None
        known = self.paces.get(claim.model)
        if not settle and known is not None and not pacing.needs_success_write(known):
            return
        usage = body.get("usage")
        usage = usage if isinstance(usage, dict) else {}
        used = int(usage.get("prompt_tokens") or 0) + int(usage.get("completion_tokens") or 0)

        def change(p: Pace) -> Pace:
            p = pacing.after_success(p)
            return pacing.settle(p, budget, claim.reserved_tokens, used, now) if settle else p

        self.pace(claim, change)

    def _defer(
        self, claim: Claim, result: CallResult, started: float, finished: float, log: dict[str, Any]
    ) -> bool:
        """Backpressure: not an attempt, not a strike. The (region, model) waits (shared
        not_before) and halves its concurrency; the execution waits until then (or, with
        failover any, another region serving the model may take it at once)."""
        name = self.region.name
        budget = self.region.budget(claim.model)
        error = dict(result.error or {"code": "deferred", "message": "backpressure"})
        wait = pacing.deferral_wait(result.retry_after_s, error.get("ratelimit"))

        def change(p: Pace) -> Pace:
            p = pacing.after_deferral(p, finished, wait, started)
            if claim.reserved_tokens and budget.tpm is not None:  # refused: nothing used
                p = pacing.settle(p, budget, claim.reserved_tokens, 0, finished)
            return p

        pace = self.pace(claim, change)
        not_before = pace.not_before or finished + wait
        retry_at = finished if claim.failover.value == "any" else not_before
        error.update(deferred=True, wait_s=round(wait, 3))
        metrics.DEFERRALS.labels(name, claim.model, str(error.get("code"))).inc()
        if rules.past_deadline(claim.deadline_at, not_before):
            return self.end_at_deadline(claim, error, started, finished, log)
        written = self.store.defer(
            claim.execution_id, claim.token, error, finished, started, retry_at
        )
        if written:
            self.on_retry_scheduled(retry_at)
            self.wakeup.wake_at(not_before)
        logger.info(
            "call deferred",
            extra={
                **log,
                "error": error.get("code"),
                "not_before": not_before,
                "limit": pace.limit,
            },
        )
        return written
