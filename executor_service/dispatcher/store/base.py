"""The dispatcher's store: one small interface, two implementations (SQLite, PostgreSQL).

The store owns everything that must hold across processes and crashes: jobs,
executions and their attempts, leases with fencing tokens, each region's
concurrency (counted at claim time under a lock, so two dispatcher
processes never send a region more than its slots), and each region's
circuit state. Scheduling *decisions* (backoff, dead-lettering, circuit
opening) are made by the scheduler in Python and applied here atomically.

All times are float seconds since the epoch from the caller's clock, so tests
drive time without sleeping.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

# How long a failover-any retry that failed in a region waits, once due, before that
# same region may take it back (claim step 2): other regions' head start.
DEFAULT_RETRY_HANDOFF_S = 0.5


class StoreError(Exception):
    """The store failed."""


class IdempotencyConflict(StoreError):
    """The idempotency key was used before with a different request body."""


class State(str, Enum):
    """Execution states: queued -> leased -> succeeded | retry_wait | dead | cancelled;
    retry_wait -> leased."""

    QUEUED = "queued"
    LEASED = "leased"
    SUCCEEDED = "succeeded"
    RETRY_WAIT = "retry_wait"
    DEAD = "dead"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in {State.SUCCEEDED, State.DEAD, State.CANCELLED}


class Failover(str, Enum):
    ANY = "any"  # a failed call may be retried by any region serving the model
    NONE = "none"  # retried only in the requested region (cross-region comparisons)


@dataclass(frozen=True)
class NewJob:
    """A validated job, ready to be expanded into executions (question x model x region)."""

    tenant: str
    questions: list[str]
    models: list[str]
    # model -> the regions it is requested in (already defaulted and validated)
    regions_by_model: dict[str, list[str]]
    failover: Failover = Failover.ANY
    max_attempts: int = 3
    priority: int = 0
    idempotency_key: str | None = None
    # hash of the canonical request body: same key + same hash -> same job
    request_hash: str = ""
    params: dict[str, Any] = field(default_factory=dict)  # max_tokens, temperature, seed...


@dataclass(frozen=True)
class Job:
    id: str
    tenant: str
    created_at: float
    failover: Failover
    max_attempts: int
    priority: int
    questions: list[str]
    models: list[str]
    regions_by_model: dict[str, list[str]]
    params: dict[str, Any]
    idempotency_key: str | None
    cancelled: bool
    total: int  # executions


@dataclass(frozen=True)
class Attempt:
    number: int
    region: str
    started_at: float
    finished_at: float | None
    ok: bool
    error: dict[str, Any] | None  # {"code", "message", "status"?, "retry_after_s"?}


@dataclass(frozen=True)
class Execution:
    id: int
    job_id: str
    tenant: str
    question_index: int
    question: str
    model: str
    requested_region: str
    executed_region: str | None
    state: State
    attempts: int
    due_at: float | None
    last_error: dict[str, Any] | None
    output: str | None
    result: dict[str, Any] | None  # the executor's full 200 body
    created_at: float
    finished_at: float | None
    attempt_log: list[Attempt] = field(default_factory=list)


@dataclass(frozen=True)
class Claim:
    """A leased execution: the worker owns it while ``token`` is current."""

    execution_id: int
    token: str
    job_id: str
    tenant: str
    question_index: int
    question: str
    model: str
    requested_region: str
    region: str  # where it runs now
    attempt: int  # 1-based number of this attempt
    max_attempts: int
    failover: Failover
    params: dict[str, Any]
    lease_expires_at: float
    source: str  # "global_retry" | "own_retry" | "new": which queue it came from


@dataclass(frozen=True)
class RegionSpec:
    """What the store needs of a region to claim for it."""

    name: str
    concurrency: int
    models: frozenset[str]


@dataclass(frozen=True)
class RegionQueue:
    region: str
    queued: int  # new work requested here
    retry_wait: int  # this region's own retries waiting
    in_flight: int  # leased and running here
    circuit: str  # "closed" | "open" | "half_open"
    circuit_open_until: float | None


@dataclass(frozen=True)
class QueueStats:
    global_retry: int  # retry_wait executions that may fail over
    regions: list[RegionQueue]
    dead: int


class Store(ABC):
    """Operations are atomic; each says what it guarantees under concurrency."""

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
    def executions(self, job_id: str, with_attempts: bool = True) -> list[Execution]:
        """The job's executions in (question_index, model, requested_region) order."""

    @abstractmethod
    def cancel_job(self, tenant: str, job_id: str, now: float) -> int:
        """Queued and retry_wait executions become cancelled (leased ones finish and
        keep their result). Returns how many were cancelled."""

    # -- scheduling ---------------------------------------------------------
    @abstractmethod
    def claim(
        self,
        region: RegionSpec,
        limit: int,
        now: float,
        lease_s: float,
        worker: str,
        tenant_batch: int,
        retry_handoff_s: float = DEFAULT_RETRY_HANDOFF_S,
    ) -> list[Claim]:
        """Lease up to ``limit`` executions for ``region``, never letting the region's
        leased count exceed ``region.concurrency`` across all processes. Order:
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
        Each claim gets a fresh token, attempts += 1, lease_expires_at = now + lease_s."""

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
        with last_region = the region it failed in. False if the lease was lost."""

    @abstractmethod
    def release(self, execution_id: int, token: str, now: float) -> bool:
        """Give a lease back without it counting as an attempt (shutdown): the
        execution returns to the state it was claimed from, due now."""

    @abstractmethod
    def reap_expired(self, now: float, max_backoff_s: float = 0.0) -> int:
        """Expired leases become retry_wait due now (the attempt is recorded as
        error code lease_expired), or dead when attempts are exhausted. Returns count."""

    @abstractmethod
    def divert_queued(self, region: str, now: float) -> int:
        """Hand a region's queued failover-any work to the other regions (its circuit
        is open): those executions become retry_wait, due ``now``, with last_region =
        ``region`` and failed_at = ``now``, without an attempt counted (they never
        ran), so claim step 1 gives them to any other region serving the model.
        Failover-none work stays queued: it waits for its region. Rows another
        claimer holds locked right now are skipped (the next divert takes them).
        Returns how many were moved."""

    # -- regions ------------------------------------------------------------
    @abstractmethod
    def set_circuit(self, region: str, state: str, open_until: float | None) -> None: ...

    @abstractmethod
    def queue_stats(self, now: float, regions: Sequence[RegionSpec]) -> QueueStats: ...

    @abstractmethod
    def job_finished(self, job_id: str) -> bool:
        """True when every execution of the job is in a final state."""
