"""The records the dispatcher's stores keep and hand out: jobs, executions, their
attempts, leases (claims), and what a claim or the queue view needs of a region.
Plain frozen dataclasses, shared by every store and by the rules (``rules.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any


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

    @property
    def requeueable(self) -> bool:
        """What POST /jobs/<id>/retry may put back in the queue (cancelled only if asked)."""
        return self in {State.DEAD, State.CANCELLED}


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
    failover: Failover = Failover.ANY  # the API defaults to none (schemas.py)
    max_attempts: int = 3
    priority: int = 0
    idempotency_key: str | None = None
    # hash of the canonical request body: same key + same hash -> same job
    request_hash: str = ""
    params: dict[str, Any] = field(default_factory=dict)  # max_tokens, temperature, seed...
    # schedule-to-close: what is left when it passes ends dead with deadline_exceeded
    deadline_s: float | None = None
    # per question, the chat messages of its call (system prompt first), or None for
    # a plain prompt (the question's text); empty: every question is a plain prompt
    messages: list[list[dict[str, str]] | None] = field(default_factory=list)
    samples: int = 1  # each (question, model, region) is asked this many times
    name: str | None = None
    tags: list[str] = field(default_factory=list)


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
    deadline_at: float | None = None  # created_at + deadline_s
    samples: int = 1
    name: str | None = None
    tags: list[str] = field(default_factory=list)


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
    deferrals: int = 0  # calls refused for rate or capacity (not attempts)
    sample: int = 0  # 0..samples-1: repeats of one (question, model, region)
    messages: list[dict[str, str]] | None = None  # the call's chat messages; None: prompt
    # attempts made before the current round (a retry of the job starts a new round):
    # attempts - attempt_base is this round's count, attempt_log keeps them all
    attempt_base: int = 0
    hedges: int = 0  # second copies sent for stragglers (hedging.py; not attempts)

    @property
    def key(self) -> ExecutionKey:
        """Its place in a job's results order (``Store.executions``): a page's last key
        is where the next page starts."""
        return (self.question_index, self.model, self.requested_region, self.id)


# (question_index, model, requested_region, id): the order of a job's results, compared
# by code points (SQLite's BINARY, PostgreSQL's COLLATE "C", Python's str).
ExecutionKey = tuple[int, str, str, int]


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
    deferrals: int = 0  # deferrals before this call (the call's number: attempt + deferrals)
    reserved_tokens: int = 0  # taken from the (region, model)'s tpm budget at claim
    deadline_at: float | None = None  # the job's deadline
    sample: int = 0
    messages: list[dict[str, str]] | None = None  # the call's chat messages; None: prompt
    hedges: int = 0  # hedges sent before this call (counted in its number)
    # A hedge (hedging.py): the lease token of the call it races; its own token is a seat's
    hedge_of: str | None = None

    @property
    def call(self) -> int:
        """This call's number among every call sent for the execution (attempts,
        deferrals, hedges): its attempt-log number and its request id's last part."""
        return self.attempt + self.deferrals + self.hedges


class Claims(list[Claim]):
    """What a claim leased, plus why the models it could not claim for were held back
    (``held``: model -> pacing.Allowance), for the claim loop's wait and the job view."""

    held: dict[str, Any]

    def __init__(self, claims: list[Claim] | None = None, held: dict[str, Any] | None = None):
        super().__init__(claims or [])
        self.held = held or {}


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
    paces: list[Any] = field(default_factory=list)  # pacing.Pace of each (region, model)


@dataclass(frozen=True)
class QueueStats:
    global_retry: int  # retry_wait executions that may fail over
    regions: list[RegionQueue]
    dead: int


# The phases a job is listed by (GET /jobs?state=): what ``api.job_view`` reports,
# as three facts a store can test: the job's cancel flag; some execution is not
# final ("unfinished"); some execution has left the queue ("started").
# None: either. The job view derives the same phases from its counts.
JOB_PHASES: dict[str, dict[str, bool | None]] = {
    "queued": {"cancelled": False, "unfinished": True, "started": False},
    "running": {"cancelled": False, "unfinished": True, "started": True},
    "finished": {"cancelled": False, "unfinished": False, "started": None},
    "cancelling": {"cancelled": True, "unfinished": True, "started": None},
    "cancelled": {"cancelled": True, "unfinished": False, "started": None},
}


@dataclass(frozen=True)
class JobQuery:
    """One page of a tenant's jobs, newest first (``Store.list_jobs``)."""

    tenant: str
    limit: int
    # the last job of the previous page, (created_at, id): the page starts after it
    after: tuple[float, str] | None = None
    state: str | None = None  # a key of JOB_PHASES
    name: str | None = None  # case-insensitive substring of the job's name


@dataclass(frozen=True)
class RetryRequest:
    """What ``Store.retry_job`` re-queues: the job's dead executions (and cancelled
    ones if asked), optionally only those requested in ``regions`` or of ``models``."""

    tenant: str
    job_id: str
    now: float
    include_cancelled: bool = False
    regions: tuple[str, ...] | None = None
    models: tuple[str, ...] | None = None
