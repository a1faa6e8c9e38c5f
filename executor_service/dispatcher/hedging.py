"""Hedged calls: a job's makespan is set by its slowest call, so a straggler near the end
of a job gets a second copy, and the first answer wins.

When (the rules are ``rules.py``'s): a call has run longer than the p95 of the calls of
its (region, model) observed by this process (``LatencyStats``: in-process, the last
``P95_WINDOW`` answers, none before ``MIN_SAMPLES``, capped at ``MEDIANS`` medians), its
job is in its tail (at most ``ES_HEDGE_TAIL_FRACTION`` of its executions unfinished),
the job has hedges left (``ES_HEDGE_MAX_FRACTION`` of its executions, counted in the
store across processes), and the call may be repeated (never temperature > 0 without a
seed). Where: its own
region for failover "none", any region serving the model for "any" (others first).

How (durably, ``Store.hedge``): the hedge is a second call of the same execution with
its own call number and request id (``job.execution.call``), holding a seat of its own
region's concurrency (a claim counts hedge seats with leases, so a region is never over
its concurrency) and its share of the model's rpm/tpm budget. The first answer is
recorded, once: the original's ``complete`` (its lease) or the hedge's
``complete_hedge`` (fenced on that same lease). The loser is ignored, not cancelled: its
answer is fenced out and logged in the attempt log (codes ``hedge_lost`` and
``hedged``); it keeps its seat until its call ends, because a seat is free only once its
call surely ended (DESIGN.md, Timeouts). ``Hedger`` runs a check every ``CHECK_S`` in
its own thread (``check_once`` for a stepped test); region workers tell it when their
calls start and end (``started``, ``finished``).
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import metrics, rules
from .client import CallResult, Outcome
from .config import DispatcherSettings
from .jobs import call_params, request_id_for
from .rules import ClaimRequest, HedgeRequest
from .scheduler import Clock
from .store.base import Claim, State, Store, StoreError

if TYPE_CHECKING:
    from .worker import RegionWorker

logger = logging.getLogger(__name__)

# The p95 of a (region, model) is taken over its last 200 answers (a few minutes of a
# busy model, so a model that slows down is followed), once 20 are in (fewer make a p95
# that is the maximum of a handful).
P95_WINDOW = 200
MIN_SAMPLES = 20
# The p95 is capped at this many medians: with a tail heavier than 5% of the calls, or
# a few stragglers among a (region, model)'s first answers, the p95 is a straggler's own
# latency and would never call anything a straggler (measured: docs/benchmarks-dispatcher.md).
MEDIANS = 3.0
# How often the hedger looks at the calls in flight: a straggler is hedged within 50 ms
# of passing its p95; a look is a scan of this process's calls, no store query unless
# one is straggling.
CHECK_S = 0.05
# A job found outside its tail (or out of hedges) is looked at again after this long: its
# counts are one query per look, a GROUP BY over a big job's executions.
JOB_LOOK_S = 1.0
_D = DispatcherSettings.default


@dataclass(frozen=True)
class HedgeConfig:
    """The hedging settings (defaults: the settings')."""

    enabled: bool = _D("hedge")
    max_fraction: float = _D("hedge_max_fraction")
    tail_fraction: float = _D("hedge_tail_fraction")

    @classmethod
    def from_settings(cls, settings: DispatcherSettings) -> HedgeConfig:
        return cls(settings.hedge, settings.hedge_max_fraction, settings.hedge_tail_fraction)


class LatencyStats:
    """Observed call latencies per (region, model), in this process (thread-safe)."""

    def __init__(self, window: int = P95_WINDOW, min_samples: int = MIN_SAMPLES) -> None:
        self.min_samples = min_samples
        self._seen: dict[tuple[str, str], deque[float]] = defaultdict(lambda: deque(maxlen=window))
        self._lock = threading.Lock()

    def observe(self, region: str, model: str, seconds: float) -> None:
        with self._lock:
            self._seen[(region, model)].append(seconds)

    def p95(self, region: str, model: str) -> float | None:
        """The 95th percentile (nearest rank), capped at MEDIANS x the median; None below
        ``min_samples``."""
        with self._lock:
            seen = sorted(self._seen.get((region, model), ()))
        if len(seen) < self.min_samples:
            return None
        p95 = seen[min(len(seen) - 1, int(0.95 * len(seen)))]
        return min(p95, MEDIANS * seen[len(seen) // 2])


@dataclass
class _Running:
    claim: Claim
    started: float
    hedge: Claim | None = None


@dataclass
class Hedger:
    """Watches this process's calls and hedges its stragglers (see the module)."""

    store: Store
    workers: Mapping[str, RegionWorker]
    config: HedgeConfig
    clock: Clock
    lease_s: float
    stats: LatencyStats = field(default_factory=LatencyStats)
    sent: int = 0  # hedges sent by this process
    won: int = 0  # of which answered first
    _running: dict[tuple[int, str], _Running] = field(default_factory=dict)
    _quiet_until: dict[str, float] = field(default_factory=dict)  # job -> next look
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # -- hooks of the region workers -----------------------------------------------
    def started(self, claim: Claim, when: float) -> None:
        if self.config.enabled:
            with self._lock:
                self._running[(claim.execution_id, claim.token)] = _Running(claim, when)

    def hedged(self, claim: Claim) -> bool:
        """Whether this first call, still running here, has a hedge racing it."""
        with self._lock:
            running = self._running.get((claim.execution_id, claim.token))
        return running is not None and running.hedge is not None

    def finished(self, claim: Claim, result: CallResult | None, started: float) -> None:
        """A first call ended (its outcome already written by the recorder)."""
        now = self.clock()
        if result is not None and result.ok and not result.reused:
            self.stats.observe(claim.region, claim.model, now - started)
        with self._lock:
            running = self._running.pop((claim.execution_id, claim.token), None)
        if running is None or running.hedge is None:
            return
        # Hedged: if the hedge answered first, this call's lease became a seat; free it.
        hedge = running.hedge
        error = {
            "code": "hedged",
            "message": f"the hedge (call {hedge.call} in {hedge.region}) answered first; "
            "this call's answer was not used",
        }
        self._end_seat(claim, error, started, now)

    # -- the check -------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """The check every CHECK_S until ``stop`` (nothing at all when hedging is off)."""
        while self.config.enabled and not stop.wait(CHECK_S):
            try:
                self.check_once()
            except StoreError:
                logger.exception("hedge check failed")

    def check_once(self) -> int:
        """Hedge the stragglers that may be hedged now; returns how many were sent."""
        if not self.config.enabled:
            return 0
        now = self.clock()
        self._quiet_until = {j: t for j, t in self._quiet_until.items() if t > now}
        with self._lock:
            candidates = [
                r
                for r in self._running.values()
                if r.hedge is None
                and rules.hedgeable(r.claim.params)
                and rules.straggling(now - r.started, self.stats.p95(r.claim.region, r.claim.model))
            ]
        jobs: dict[str, tuple[int, int]] = {}
        sent = 0
        for running in candidates:
            claim = running.claim
            if self._quiet_until.get(claim.job_id, 0.0) > now:
                continue
            if claim.job_id not in jobs:
                counts = self.store.job_counts(claim.job_id)
                states = [(s, n) for by_state in counts.values() for s, n in by_state.items()]
                unfinished = sum(n for s, n in states if not State(s).final)
                jobs[claim.job_id] = (unfinished, sum(n for _, n in states))
            unfinished, total = jobs[claim.job_id]
            budget = rules.hedge_budget(total, self.config.max_fraction)
            if budget <= 0 or not rules.in_tail(unfinished, total, self.config.tail_fraction):
                self._quiet_until[claim.job_id] = now + JOB_LOOK_S
                continue
            hedge = self._take_seat(claim, budget, now)
            if hedge is None:
                continue  # no seat, no budget or the call ended: looked at again next time
            with self._lock:
                if self._running.get((claim.execution_id, claim.token)) is running:
                    running.hedge = hedge
            self._launch(hedge, now)
            sent += 1
        return sent

    def _take_seat(self, claim: Claim, budget: int, now: float) -> Claim | None:
        serving = [n for n, w in self.workers.items() if claim.model in w.spec.models]
        for name in rules.hedge_regions(claim.failover, claim.region, serving):
            worker = self.workers.get(name)
            if worker is None or claim.model not in worker.spec.models:
                continue
            request = ClaimRequest(
                region=worker.spec,
                limit=1,
                now=now,
                lease_s=rules.seat_lease_s(self.lease_s, worker.region.timeout_s),
                worker=worker.worker_id,
                tenant_batch=1,
                circuit_caps=worker.circuits.allowances(1),
                budgets=worker.region.limits,
            )
            hedge = self.store.hedge(
                HedgeRequest(request, claim.execution_id, claim.token, claim.model, budget)
            )
            if hedge is not None:
                return hedge
        return None

    def _launch(self, hedge: Claim, now: float) -> None:
        self.sent += 1
        metrics.HEDGES.labels(hedge.region, "sent").inc()
        logger.info(
            "hedging a straggler",
            extra={
                "job_id": hedge.job_id,
                "execution": hedge.execution_id,
                "call": hedge.call,
                "region": hedge.region,
                "model": hedge.model,
            },
        )
        worker = self.workers[hedge.region]
        worker.submit(lambda: self._run_hedge(worker, hedge, now))

    def _run_hedge(self, worker: RegionWorker, hedge: Claim, started: float) -> None:
        """The hedge's call, on its region's pool: the first answer wins, the loser is
        logged and its seat freed."""
        result: CallResult | None = None
        try:
            try:
                result = worker.client.execute(
                    hedge.model, hedge.question, request_id_for(hedge), call_params(hedge)
                )
            except Exception as exc:  # a bug in the client, not the executor's answer
                logger.exception("hedge call raised")
                result = CallResult(
                    Outcome.RETRYABLE,
                    error={"code": "dispatcher_error", "message": f"{type(exc).__name__}: {exc}"},
                )
            now = self.clock()
            if result.ok:
                assert result.body is not None
                self.stats.observe(hedge.region, hedge.model, now - started)
                eid, token, body = hedge.execution_id, hedge.token, result.body
                if self.store.complete_hedge(eid, token, body, now, started):
                    self.won += 1
                    metrics.HEDGES.labels(hedge.region, "won").inc()
                    return
                error: dict[str, Any] = {
                    "code": "hedge_lost",
                    "message": "the first call ended before this hedge; its answer was not used",
                }
            else:
                error = {
                    "code": "hedge_failed",
                    "message": "the hedge failed; the first call goes on",
                    "last": result.error,
                }
            self._end_seat(hedge, error, started, now)
        except StoreError:  # the seat expires with the call's deadline
            logger.exception("recording a hedge failed", extra={"execution": hedge.execution_id})
        finally:
            worker.wake()  # a seat is free

    def _end_seat(self, claim: Claim, error: dict[str, Any], started: float, now: float) -> None:
        try:
            self.store.end_seat(claim.execution_id, claim.token, error, now, started)
        except StoreError:  # the seat expires with the call's deadline
            logger.exception("freeing a hedge seat failed")
