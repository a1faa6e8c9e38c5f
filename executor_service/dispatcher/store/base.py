"""The dispatcher's store: one small interface, three implementations (memory.py for unit
tests, sqlite.py for one host, postgres.py for many processes).

The store owns everything that must hold across processes and crashes: jobs,
executions and their attempts, leases with fencing tokens, each region's
concurrency (counted at claim time under a lock, so two dispatcher
processes never send a region more than its slots), and each region's
circuit state. Every scheduling *decision* (dead-lettering, cancel finality,
what a reaped or released lease becomes, the claim order) is made in Python by
``dispatcher/rules.py`` and the scheduler; a store applies them atomically.

All times are float seconds since the epoch from the caller's clock, so tests
drive time without sleeping.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from executor_service.dispatcher.store.models import (
    Attempt,
    Claim,
    Claims,
    Execution,
    ExecutionKey,
    Failover,
    Job,
    JobQuery,
    NewJob,
    QueueStats,
    RegionQueue,
    RegionSpec,
    RetryRequest,
    State,
)
from executor_service.exceptions import ExecutorServiceError

if TYPE_CHECKING:
    from executor_service.dispatcher.pacing import Pace, PaceChange
    from executor_service.dispatcher.rules import ClaimRequest, HedgeRequest

__all__ = [  # the records are defined in models.py
    "NOT_SUBSCRIBED",
    "Attempt",
    "Claim",
    "Claims",
    "Execution",
    "ExecutionKey",
    "Failover",
    "IdempotencyConflict",
    "Job",
    "JobQuery",
    "NewJob",
    "QueueStats",
    "RegionQueue",
    "RegionSpec",
    "RetryRequest",
    "State",
    "Store",
    "StoreError",
    "Subscription",
]


class StoreError(ExecutorServiceError):
    """The store failed."""


class IdempotencyConflict(StoreError):
    """The idempotency key was used before with a different request body."""


class Subscription(Protocol):
    """A running ``Store.subscribe``: ``close`` stops it."""

    def close(self) -> None: ...


class _NotSubscribed:
    def close(self) -> None:
        """Nothing runs: the store cannot tell across processes."""


NOT_SUBSCRIBED: Subscription = _NotSubscribed()


class Store(ABC):
    """Operations are atomic; each says what it guarantees under concurrency."""

    def subscribe(self, on_due: Callable[[float], None]) -> Subscription:
        """Hear, across processes, that work becomes claimable at a time: ``on_due(at)``
        is called (from a thread of the store's) after another process - or this one -
        committed a job, a retry due at ``at``, a released or reaped lease, diverted
        work; and with ``at`` = 0 (due already) when notices may have been missed (the
        listening connection was lost). ``NOT_SUBSCRIBED``: this store cannot, its
        claimers poll (memory: one process; SQLite: no server to notify through)."""
        return NOT_SUBSCRIBED

    @abstractmethod
    def migrate(self) -> None:
        """Apply the versioned SQL migrations not yet applied."""

    @abstractmethod
    def close(self) -> None: ...

    # -- jobs ---------------------------------------------------------------
    @abstractmethod
    def create_job(self, job: NewJob, now: float) -> tuple[Job, bool]:
        """Insert the job and all its executions (state queued) in one transaction.
        Returns (job, created). With an idempotency key already used by the tenant:
        the same request_hash returns the existing job and False; another hash
        raises IdempotencyConflict."""

    @abstractmethod
    def get_job(self, tenant: str, job_id: str) -> Job | None:
        """The tenant's job, or None (another tenant's job is None too)."""

    @abstractmethod
    def job_counts(self, job_id: str) -> dict[str, dict[str, int]]:
        """{requested_region: {state: count}} for the job."""

    @abstractmethod
    def executions(
        self,
        job_id: str,
        with_attempts: bool = True,
        after: ExecutionKey | None = None,
        limit: int | None = None,
    ) -> list[Execution]:
        """The job's executions in ``Execution.key`` order (question_index, model,
        requested_region, id); ``limit`` of them after the key ``after`` (keyset paging:
        each page is an index range, so reading a job page by page stays linear, where
        OFFSET paging re-read every earlier page)."""

    @abstractmethod
    def list_jobs(self, query: JobQuery) -> list[Job]:
        """A page of the tenant's jobs, newest first (created_at, then id, descending),
        after ``query.after``, filtered by phase (``models.JOB_PHASES``, as the job
        view derives it from the executions' states and the cancel flag) and by a
        case-insensitive substring of the name."""

    @abstractmethod
    def retry_job(self, request: RetryRequest) -> int:
        """Re-queue the job's dead (and, if asked, cancelled) executions, only those
        requested in ``request.regions`` / of ``request.models`` when given: each goes
        back to ``queued`` in its requested region with a fresh budget of attempts
        (``attempt_base`` = attempts so far, ``max_attempts`` = that + the job's), its
        lease, answer and last error cleared, its attempt log kept. The job's cancel
        flag is cleared when anything is re-queued, so it runs again. Returns how many
        were re-queued (0 for another tenant's job)."""

    @abstractmethod
    def cancel_job(self, tenant: str, job_id: str, now: float) -> int:
        """Queued and retry_wait executions become cancelled (leased ones finish and
        keep their result). Returns how many were cancelled."""

    # -- scheduling ---------------------------------------------------------
    @abstractmethod
    def claim(self, request: ClaimRequest) -> Claims:
        """Lease up to ``request.limit`` executions for ``request.region``, never letting
        the region's leased count exceed its concurrency across all processes. The
        order is ``rules.pick`` (the store answers its ``ClaimQueues`` queries):
        1. global retry queue: retry_wait, due, failover any, model served by the
           region, last failed in another region; oldest failure first (this is also
           where work diverted from a region with an open circuit is picked up);
        2. the region's own retries: retry_wait, due, requested here or (failover
           any and last failed here). A failover-any execution that last failed
           here is taken back only once it has been due for ``retry_handoff_s``:
           other regions get a head start on it through step 1, so a failing
           region does not spend every attempt itself. It still comes back after
           the hand-off, so work no other region serves is never stranded.
           Failover-none retries are taken as soon as they are due;
        3. new work requested here, round-robin across tenants (at most
           ``tenant_batch`` per tenant, tenants with fewer in flight here first),
           then job priority (high first), job age, question order.
        Each claim gets a fresh token, attempts += 1, lease_expires_at = now + lease_s.

        Pacing (``rules.plan_claim``), in the same transaction: each (region, model)'s
        shared pacing row is locked; a model whose not_before has not passed, whose
        adaptive concurrency is used up, whose rpm/tpm budget is empty, or whose
        circuit (``request.circuit_caps``) is open, is held back on its own; a
        budgeted model's picks are trimmed to what its buckets hold and the tokens
        reserved (``Claim.reserved_tokens``). The result's ``held`` says why."""

    @abstractmethod
    def heartbeat(self, leases: Sequence[tuple[int, str]], now: float, lease_s: float) -> set[int]:
        """Extend the leases still held (matching token, state leased); return their ids."""

    @abstractmethod
    def complete(
        self, execution_id: int, token: str, result: dict[str, Any], now: float, started_at: float
    ) -> bool:
        """Write the answer once: only with the current token of a leased execution.
        Records the attempt, executed_region, output. False if the lease was lost."""

    @abstractmethod
    def fail(
        self,
        execution_id: int,
        token: str,
        error: dict[str, Any],
        now: float,
        started_at: float,
        retry_at: float | None,
    ) -> bool:
        """Record a failed attempt (fenced by token). ``retry_at`` None dead-letters it
        with ``error`` as its last error; otherwise retry_wait, due at ``retry_at``,
        with last_region = the region it failed in; what it becomes is
        ``rules.after_failure`` (cancel finality). False if the lease was lost."""

    @abstractmethod
    def defer(
        self,
        execution_id: int,
        token: str,
        error: dict[str, Any],
        now: float,
        started_at: float,
        retry_at: float | None,
    ) -> bool:
        """Record a deferred call (backpressure: 429, 503 overloaded), fenced by token:
        logged in the attempt log like a failure, but the attempt is given back
        (attempts - 1, deferrals + 1), so it never counts toward max_attempts; the
        execution waits in retry_wait until ``retry_at`` (``rules.after_failure``:
        cancelled if its job was; None: dead, its job's deadline passed). False if the
        lease was lost."""

    @abstractmethod
    def update_pace(self, region: str, model: str, max_limit: int, change: PaceChange) -> Pace:
        """Apply ``change`` (a pacing rule) to the (region, model)'s shared pacing row
        under its lock (created at first use with ``max_limit``); return the result."""

    @abstractmethod
    def expire_deadlines(self, now: float, job_ids: Sequence[str] | None = None) -> int:
        """Jobs whose deadline has passed: their queued and retry_wait executions become
        dead with ``rules.deadline_error`` (each job once; ``job_ids``: these jobs, again,
        for work given back after the sweep). Returns how many."""

    @abstractmethod
    def release(self, execution_id: int, token: str, now: float) -> bool:
        """Give a lease back without it counting as an attempt (shutdown): the
        execution returns to the state it was claimed from, due now
        (``rules.after_release``)."""

    @abstractmethod
    def reap_expired(self, now: float, max_backoff_s: float = 0.0) -> int:
        """Expired leases become retry_wait due now (the attempt is recorded as
        error code lease_expired), or dead when attempts are exhausted, or cancelled
        (``rules.after_lease_expired``). Returns count."""

    @abstractmethod
    def divert_queued(self, region: str, now: float, model: str | None = None) -> int:
        """Hand a region's queued failover-any work (of ``model`` only, when given) to the
        other regions (its circuit is open): those executions become retry_wait, due
        ``now``, with last_region = ``region`` and failed_at = ``now``, without an
        attempt counted (they never ran), so claim step 1 gives them to any other
        region serving the model. Failover-none work stays queued: it waits for its
        region. Rows another claimer holds locked right now are skipped (the next
        divert takes them).
        Returns how many were moved."""

    # -- hedged calls (hedging.py) ----------------------------------------------
    @abstractmethod
    def hedge(self, request: HedgeRequest) -> Claim | None:
        """Take a seat in ``request.claim.region`` for a second call of a leased execution
        whose lease ``request.token`` is still current, or None. Atomic with claims (the
        region's lock): the region's leases plus hedge seats never exceed its
        concurrency; the model's pacing (``rules.plan_claim`` for one slot: not_before,
        adaptive concurrency, rpm/tpm, circuit) holds it back like a claim, and its
        tokens are reserved; the job's hedges across every process stay within
        ``request.max_hedges``. The execution's ``hedges`` counter gives the hedge its
        own call number (the Claim's ``call``); its token is the seat's (``hedge_of``:
        the lease it races). The seat lasts until ``end_seat`` or ``claim.expires``."""

    @abstractmethod
    def complete_hedge(
        self, execution_id: int, token: str, result: dict[str, Any], now: float, started_at: float
    ) -> bool:
        """The hedge (seat ``token``) answered: if the lease it races is still current,
        the execution succeeds with this answer (executed_region = the hedge's region,
        attempt-log entry with the hedge's number), the hedge's seat ends, and the lease
        it raced becomes a seat of its own, held until that call ends (``end_seat``) or
        its lease would have expired: the first call's later answer is fenced out (its
        token is no longer a lease). False (nothing written) if the first call's result
        (or a reap, a release) came first."""

    @abstractmethod
    def end_seat(
        self, execution_id: int, token: str, error: dict[str, Any], now: float, started_at: float
    ) -> bool:
        """A call holding a seat (a hedge, or the loser of a hedge race) ended: free the
        seat and log the call in the attempt log as not ok with ``error`` (why its answer
        was not used). False if there was no such seat (already ended or expired)."""

    # -- regions ------------------------------------------------------------
    @abstractmethod
    def set_circuit(self, region: str, state: str, open_until: float | None) -> None: ...

    @abstractmethod
    def queue_stats(self, now: float, regions: Sequence[RegionSpec]) -> QueueStats: ...

    @abstractmethod
    def paces(self, regions: Sequence[str]) -> list[Pace]:
        """The shared pacing state of every (region, model) of these regions."""

    @abstractmethod
    def job_finished(self, job_id: str) -> bool:
        """True when every execution of the job is in a final state."""
