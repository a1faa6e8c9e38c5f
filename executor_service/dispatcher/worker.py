"""The dispatcher runtime: one claim loop and one call pool per region, a heartbeat
and a reaper.

Each region claims only for its own free slots and runs calls on its own pool of
``concurrency`` threads, so a slow or broken region never holds up another. A region's
loop wakes on a short poll interval (work submitted through the API, or by another
process), immediately when one of its calls finishes (a slot is free), and when a retry
scheduled here (or, on PostgreSQL, in another process) becomes due, and after its hand-off. While a
(region, model)'s circuit (circuit.py) is open, its queued failover-any work goes to the
other regions. Backpressure is not failure: what a finished call does is recording.py's
(pacing.py's rules). The heartbeat extends the leases of calls in flight; the reaper
returns expired leases to the queue; the deadline sweep ends what is left of expired
jobs. Stopping stops claiming, lets calls in flight finish within a grace period, and
releases what remains.

Steppable: the call pool and the claim loop's wait are passed in (``runtime.py``), and
``claim_once``, ``heartbeat_once`` and ``reap_once`` are the loops' single turns. A test
gives ``Dispatcher`` an ``InlinePool``, a ``ManualWakeup`` and a fake clock, and drives
``step()``: no threads, no sleeps. The loops catch ``StoreError`` only (an outage is
expected, retried after a pause); any other exception is a bug and crashes loudly.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from . import metrics, pacing, rules
from .circuit import ModelCircuits
from .client import Caller, CallResult, ExecutorClient, Outcome
from .config import DispatcherSettings
from .hedging import HedgeConfig, Hedger
from .jobs import call_params, request_id_for
from .recording import Recorder
from .regions import Region, Regions
from .rules import ClaimRequest
from .runtime import DaemonPool, Pool, ThreadWakeup, Wakeup
from .scheduler import BackoffPolicy, Clock, RetryScheduler
from .store.base import NOT_SUBSCRIBED, Claim, Store, StoreError, Subscription

logger = logging.getLogger(__name__)

# After a store error a loop waits this long (each failing query already waited for a
# connection): no busy loop in an outage, work resumes within 0.25 s of its end.
STORE_ERROR_PAUSE_S = 0.25
# Deadline sweeps: a job's leftovers end within a second, for one indexed query a second.
DEADLINE_SWEEP_S = 1.0


ClientFactory = Callable[[Region], Caller]
PoolFactory = Callable[[Region], Pool]
WakeupFactory = Callable[[Clock], Wakeup]
_D = DispatcherSettings.default  # every default below is the setting's, defined once


@dataclass(frozen=True)
class WorkerConfig:
    """The runtime's knobs, from the settings (defaults: the settings' defaults)."""

    lease_s: float = _D("lease_s")
    tenant_batch: int = _D("tenant_batch")
    claim_poll_s: float = _D("claim_poll_s")
    shutdown_grace_s: float = _D("shutdown_grace_s")
    circuit_threshold: int = _D("circuit_threshold")
    circuit_cooldown_s: float = _D("circuit_cooldown_s")
    retry_handoff_s: float = _D("retry_handoff_s")
    schedule_to_start_s: float = _D("schedule_to_start_s")
    backoff: BackoffPolicy = field(default_factory=BackoffPolicy)
    hedging: HedgeConfig = field(default_factory=HedgeConfig)

    @classmethod
    def from_settings(cls, settings: DispatcherSettings) -> WorkerConfig:
        return cls(
            lease_s=settings.lease_s,
            tenant_batch=settings.tenant_batch,
            claim_poll_s=settings.claim_poll_s,
            shutdown_grace_s=settings.shutdown_grace_s,
            circuit_threshold=settings.circuit_threshold,
            circuit_cooldown_s=settings.circuit_cooldown_s,
            retry_handoff_s=settings.retry_handoff_s,
            schedule_to_start_s=settings.schedule_to_start_s,
            backoff=BackoffPolicy.from_settings(settings),
            hedging=HedgeConfig.from_settings(settings),
        )

    @property
    def heartbeat_s(self) -> float:
        # Three heartbeats per lease: one lost beat (a slow store) does not lose the lease.
        return self.lease_s / 3

    @property
    def reap_s(self) -> float:
        # A crashed process's work is back in the queue within 1.5 leases.
        return self.lease_s / 2


class RegionWorker:
    """Claims and runs one region's executions."""

    def __init__(
        self,
        region: Region,
        store: Store,
        client: Caller,
        retries: RetryScheduler,
        config: WorkerConfig,
        clock: Clock,
        worker_id: str,
        on_retry_scheduled: Callable[[float], None] = lambda _at: None,
        pool: Pool | None = None,
        wakeup: Wakeup | None = None,
    ) -> None:
        self.region = region
        self.spec = region.spec()
        self.store = store
        self.client = client
        self.retries = retries
        self.config = config
        self.clock = clock
        self.worker_id = worker_id
        self.on_retry_scheduled = on_retry_scheduled
        self.circuits = ModelCircuits(
            region, store, config, clock, lambda m, p: self.recorder.paces.__setitem__(m, p)
        )
        self.held: dict[str, pacing.Allowance] = {}  # why the last claim held models back
        self._cond = threading.Condition()  # guards _inflight
        self._inflight: dict[int, Claim] = {}
        self.wakeup = wakeup or ThreadWakeup(clock)
        self.recorder = Recorder(
            region, store, retries, clock, self.wakeup, lambda at: self.on_retry_scheduled(at)
        )
        self._stopping = threading.Event()
        self._pool = pool
        self._opened = False
        self._thread: threading.Thread | None = None
        self.hedger: Hedger | None = None  # told when calls start and end (hedging.py)

    # -- lifecycle ----------------------------------------------------------
    def open(self) -> None:
        """Ready to claim: the call pool exists, the circuit is published (closed)."""
        if self._opened:
            return
        self._opened = True
        if self._pool is None:
            self._pool = DaemonPool(self.region.concurrency, f"call-{self.region.name}")
        self.circuits.start()

    def start(self) -> None:
        """Open, then run the claim loop in a thread of its own."""
        self.open()
        self._thread = threading.Thread(
            target=self._loop, name=f"claim-{self.region.name}", daemon=True
        )
        self._thread.start()

    def stop_claiming(self) -> None:
        self._stopping.set()
        self.wake()

    def join_loop(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def shutdown_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()

    # -- state for the heartbeat and shutdown --------------------------------
    def leases(self) -> list[tuple[int, str]]:
        with self._cond:
            return [(c.execution_id, c.token) for c in self._inflight.values()]

    def in_flight(self) -> int:
        with self._cond:
            return len(self._inflight)

    def wait_idle(self, deadline: float) -> bool:
        """Wait (monotonic ``deadline``) until no call is in flight; True if idle."""
        with self._cond:
            while self._inflight:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    def release_all(self) -> int:
        """At shutdown, calls that outlived the grace keep their leases (not released: a
        release freed the seat while the call still ran, 2x the region's concurrency);
        the lease covers the call's deadline (``rules.seat_lease_s``), then a reaper
        records the attempt and retries it. Returns how many were left."""
        left = len(self.leases())
        if left:
            logger.warning("leaving %d leases to expire", left, extra={"region": self.region.name})
        return left

    # -- waking ------------------------------------------------------------
    def wake(self) -> None:
        self.wakeup.wake()

    def wake_at(self, when: float) -> None:
        """Claim again at clock time ``when`` (a retry becomes due then)."""
        self.wakeup.wake_at(when)

    # -- claiming ----------------------------------------------------------
    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                pause = self.claim_once()
            except StoreError:
                logger.exception("claim loop error", extra={"region": self.region.name})
                pause = STORE_ERROR_PAUSE_S
            if pause > 0 and not self._stopping.is_set():
                self.wakeup.wait(pause)

    def claim_once(self) -> float:
        """Claim for the free slots and start the calls. Returns how long to wait before
        claiming again (0: at once, there may be more work for free slots)."""
        poll = self.config.claim_poll_s
        self.circuits.divert_if_due()  # a circuit not closed: its queued work goes elsewhere
        with self._cond:
            free = self.region.concurrency - len(self._inflight)
        if free <= 0:
            return poll  # a finishing call wakes us sooner
        caps = self.circuits.allowances(free)
        if not any(caps.values()):
            return self.circuits.pause_s(poll)
        started = time.monotonic()
        request = ClaimRequest(
            region=self.spec,
            limit=free,
            now=self.clock(),
            lease_s=rules.seat_lease_s(self.config.lease_s, self.region.timeout_s),
            worker=self.worker_id,
            tenant_batch=self.config.tenant_batch,
            retry_handoff_s=self.config.retry_handoff_s,
            schedule_to_start_s=self.config.schedule_to_start_s,
            circuit_caps=caps,
            budgets=self.region.limits,
        )
        try:
            claims = self.store.claim(request)
        except StoreError:
            logger.exception("claim failed", extra={"region": self.region.name})
            return STORE_ERROR_PAUSE_S
        metrics.CLAIM_SECONDS.labels(self.region.name).observe(time.monotonic() - started)
        for model, count in Counter(c.model for c in claims).items():
            self.circuits[model].claimed(count)
        self.held = dict(getattr(claims, "held", {}))
        for model, allowance in self.held.items():
            metrics.HELD_CLAIMS.labels(self.region.name, model, allowance.reason).inc()
        for claim in claims:
            self._start(claim)
        if len(claims) == free:
            return 0.0
        # A model held back until a known time (not_before, a budget refill) wakes us then.
        untils = [a.until for a in self.held.values() if a.until is not None]
        if untils:
            return min(poll, max(0.001, min(untils) - request.now))
        return poll

    def _start(self, claim: Claim) -> None:
        metrics.CLAIMED.labels(self.region.name, claim.source).inc()
        if claim.source == "global_retry":
            metrics.CROSS_REGION_RETRIES.labels(self.region.name).inc()
        with self._cond:
            self._inflight[claim.execution_id] = claim
        metrics.IN_FLIGHT.labels(self.region.name).inc()
        self.submit(lambda: self._run(claim))

    def submit(self, task: Callable[[], None]) -> None:
        """Run a call on this region's pool (a claim's, or a hedge's: hedging.py)."""
        assert self._pool is not None
        self._pool.submit(task)

    # -- running one call ----------------------------------------------------
    def _run(self, claim: Claim) -> None:
        name = self.region.name
        log = {"job_id": claim.job_id, "execution": claim.execution_id, "call": claim.call}
        log.update(attempt=claim.attempt, region=name, model=claim.model)
        started = self.clock()
        result: CallResult | None = None
        if self.hedger is not None:
            self.hedger.started(claim, started)
        try:
            if rules.past_deadline(claim.deadline_at, started):
                # Claimed as its job's deadline passed: no call. Given back (no attempt,
                # its last error kept), then ended with the rest of its job.
                self.store.release(claim.execution_id, claim.token, started)
                self.store.expire_deadlines(started, job_ids=[claim.job_id])
                return
            result = self.recorder.reuse.lookup(claim)  # an identical earlier call's answer
            try:
                result = result or self.client.execute(
                    claim.model, claim.question, request_id_for(claim), call_params(claim)
                )
            except Exception as exc:  # a bug in the client, not the executor's answer
                logger.exception("executor call raised", extra=log)
                result = CallResult(
                    Outcome.RETRYABLE,
                    error={"code": "dispatcher_error", "message": f"{type(exc).__name__}: {exc}"},
                )
            finished = self.clock()
            keep_s = rules.seat_lease_s(self.config.lease_s, self.region.timeout_s)
            self.recorder.record_until_stored(claim, result, started, finished, log, keep_s)
        except StoreError:
            # The store stayed away past the lease: the reaper gives the work back.
            logger.exception("recording the result failed", extra=log)
        finally:
            if result is not None and not result.reused:  # a reused answer tells no health
                self.circuits[claim.model].record(result.verdict, result.error)
            if self.hedger is not None:
                self.hedger.finished(claim, result, started)
            with self._cond:
                self._inflight.pop(claim.execution_id, None)
                self._cond.notify_all()
            metrics.IN_FLIGHT.labels(name).dec()
            self.wakeup.wake()  # a slot is free


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class Dispatcher:
    """Every region's worker, plus the heartbeat and the reaper, in this process."""

    def __init__(
        self,
        store: Store,
        regions: Regions,
        config: WorkerConfig | None = None,
        clock: Clock = time.time,
        rng: random.Random | None = None,
        client_factory: ClientFactory | None = None,
        worker_id: str | None = None,
        pool_factory: PoolFactory | None = None,
        wakeup_factory: WakeupFactory = ThreadWakeup,
    ) -> None:
        """``pool_factory`` (default: a DaemonPool of the region's concurrency, made at
        start) and ``wakeup_factory`` are the runtime's primitives (``runtime.py``)."""
        self.store = store
        self.regions = regions
        self.config = config or WorkerConfig()
        self.clock = clock
        self.worker_id = worker_id or default_worker_id()
        self.retries = RetryScheduler(self.config.backoff, clock, rng)
        factory = client_factory or (lambda r: ExecutorClient(r, r.api_key(), clock=clock))
        # Build every client first: a missing API key variable fails here, at start.
        self.workers = {
            region.name: RegionWorker(
                region,
                store,
                factory(region),
                self.retries,
                self.config,
                clock,
                self.worker_id,
                self._retry_scheduled,
                pool=None if pool_factory is None else pool_factory(region),
                wakeup=wakeup_factory(clock),
            )
            for region in regions
        }
        self.hedger = Hedger(store, self.workers, self.config.hedging, clock, self.config.lease_s)
        for worker in self.workers.values():
            worker.hedger, worker.recorder.hedged = self.hedger, self.hedger.hedged
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._started = False
        self._subscription: Subscription = NOT_SUBSCRIBED

    def _retry_scheduled(self, when: float) -> None:
        # Any region may take the retry (failover): wake them all when it is due, and when
        # the hand-off lets the region it failed in take it back (the store's notices too).
        for worker in self.workers.values():
            worker.wake_at(when)
            worker.wake_at(when + self.config.retry_handoff_s)

    def start(self) -> Dispatcher:
        if self._started:
            return self
        self._started = True
        for worker in self.workers.values():
            worker.start()
        self._subscription = self.store.subscribe(self._retry_scheduled)  # PostgreSQL NOTIFY
        loops = (
            (self._heartbeat, "heartbeat"),
            (self._reaper, "reaper"),
            (self._deadlines, "deadlines"),
            (lambda: self.hedger.run(self._stop), "hedger"),  # returns at once when off
        )
        for target, name in loops:
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        logger.info(
            "dispatcher started",
            extra={"worker": self.worker_id, "regions": list(self.workers)},
        )
        return self

    def in_flight(self) -> int:
        return sum(w.in_flight() for w in self.workers.values())

    def step(self) -> dict[str, float]:
        """One claim turn of every region, in this thread (a test's stepping): returns
        each region's pause before its next claim. Heartbeat and reap are
        ``heartbeat_once`` and ``reap_once``."""
        pauses = {}
        for name, worker in self.workers.items():
            worker.open()
            pauses[name] = worker.claim_once()
        return pauses

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.config.heartbeat_s):
            self.heartbeat_once()

    def heartbeat_once(self) -> int:
        """Extend every lease in flight; returns how many are still held."""
        leases = [lease for w in self.workers.values() for lease in w.leases()]
        if not leases:
            return 0
        try:
            held = self.store.heartbeat(leases, self.clock(), self.config.lease_s)
        except StoreError:
            logger.exception("heartbeat failed")
            return 0
        lost = [eid for eid, _ in leases if eid not in held]
        if lost:
            logger.warning("leases lost while calls run", extra={"executions": lost[:20]})
        return len(held)

    def _reaper(self) -> None:
        while not self._stop.wait(self.config.reap_s):
            self.reap_once()

    def reap_once(self) -> int:
        try:
            reaped = self.store.reap_expired(self.clock())
        except StoreError:
            logger.exception("reap failed")
            return 0
        if reaped:
            metrics.REAPED.inc(reaped)
            logger.warning("reaped expired leases", extra={"count": reaped})
            for worker in self.workers.values():
                worker.wake()
        return reaped

    def _deadlines(self) -> None:
        while not self._stop.wait(DEADLINE_SWEEP_S):
            self.expire_once()

    def expire_once(self) -> int:
        """End what is left of the jobs whose deadline has passed (dead, deadline_exceeded)."""
        try:
            ended = self.store.expire_deadlines(self.clock())
        except StoreError:
            logger.exception("deadline sweep failed")
            return 0
        metrics.DEADLINE_EXCEEDED.inc(ended)
        return ended

    def stop(self, grace_s: float | None = None) -> int:
        """Stop claiming, give calls in flight ``grace_s`` to finish, leave the leases of
        the rest to expire when their calls surely ended (``RegionWorker.release_all``).
        Returns how many leases were left."""
        grace = self.config.shutdown_grace_s if grace_s is None else grace_s
        for worker in self.workers.values():
            worker.stop_claiming()
        for worker in self.workers.values():
            worker.join_loop(timeout=10)
        self._subscription.close()
        deadline = time.monotonic() + grace
        for worker in self.workers.values():
            worker.wait_idle(deadline)
        left = sum(w.release_all() for w in self.workers.values())
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)
        for worker in self.workers.values():
            worker.shutdown_pool()
        logger.info("dispatcher stopped", extra={"leases_left": left})
        return left

    def run(self, stop: threading.Event) -> int:
        """Start, run until ``stop`` is set, then stop gracefully (the CLI's main loop)."""
        self.start()
        stop.wait()
        return self.stop()
