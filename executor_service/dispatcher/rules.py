"""Every scheduling rule of the dispatcher, in one place, free of I/O.

A reader who asks "when is an execution dead-lettered?", "when is a cancelled job's
failure final?", "what does a reaped lease become?" or "in which order does a region
claim?" finds the answer here. The stores (memory, SQLite, PostgreSQL) only *apply*
these decisions: they read the rows a rule needs, call the rule, and write what it
returns, so the SQL dialects differ only in locking and syntax.

What lives elsewhere: the backoff delay and the circuit breaker (``scheduler.py``: they
need a clock and randomness), and *when* a region diverts its queued work (``circuit.py``:
when its breaker opens and every cool-down after). What a divert moves is here
(``DIVERTED_FAILOVER``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, Protocol, TypeVar

from . import pacing
from .config import DispatcherSettings
from .pacing import Allowance, Budget, Pace
from .store.models import Failover, RegionSpec, State

T = TypeVar("T")

# How long a failover-any retry that failed in a region waits, once due, before that
# same region may take it back (claim step 2): other regions' head start. Defined once,
# as the default of ES_RETRY_HANDOFF_S.
DEFAULT_RETRY_HANDOFF_S: float = DispatcherSettings.default("retry_handoff_s")

# The error recorded for an attempt whose lease expired (its worker crashed or hung).
LEASE_EXPIRED_ERROR: dict[str, Any] = {
    "code": "lease_expired",
    "message": "the lease expired before its worker reported a result "
    "(the worker crashed, hung or lost the store)",
}

# The last error of what is left of a job when its deadline (schedule-to-close) passes;
# the stores keep the error it replaces under "last".
DEADLINE_EXCEEDED = "deadline_exceeded"
DEADLINE_MESSAGE = "the job's deadline passed before this execution got an answer"


def deadline_error(last: dict[str, Any] | None) -> dict[str, Any]:
    """The error of an execution ended by its job's deadline."""
    return {"code": DEADLINE_EXCEEDED, "message": DEADLINE_MESSAGE, "last": last}


def past_deadline(deadline_at: float | None, when: float) -> bool:
    """Whether ``when`` is at or past the job's deadline (None: no deadline)."""
    return deadline_at is not None and when >= deadline_at


# A region whose circuit is open hands its queued work of this failover policy to the
# other regions; failover-none work waits for its region. (The SQL of divert_queued
# spells it as a literal, as every state and policy, so the partial indexes apply.)
DIVERTED_FAILOVER = Failover.ANY


# A call can still run at the executor until its deadline (the timeout_s it was sent
# with), plus the time its answer takes to come back.
CALL_END_MARGIN_S = 5.0


def seat_lease_s(lease_s: float, call_timeout_s: float) -> float:
    """How long a claim leases its execution: a region's seat is free again only when
    the call that holds it has surely ended, so the lease outlives the call's deadline
    (DESIGN.md, Timeouts), even if its worker crashes (no heartbeat ends it sooner) or
    stops with the call still running (the lease is left to expire, not released).
    Heartbeats extend it, never shorten it."""
    return max(lease_s, call_timeout_s + CALL_END_MARGIN_S)


class Source(StrEnum):
    """Which queue a claim came from; release puts the execution back there."""

    GLOBAL_RETRY = "global_retry"
    OWN_RETRY = "own_retry"
    NEW = "new"
    # schedule-to-start: another region's queued failover-any work, queued too long there
    STALE = "schedule_to_start"


@dataclass(frozen=True)
class ClaimRequest:
    """One claim: lease up to ``limit`` executions for ``region`` at clock time ``now``."""

    region: RegionSpec
    limit: int
    now: float
    lease_s: float
    worker: str
    tenant_batch: int
    retry_handoff_s: float = DEFAULT_RETRY_HANDOFF_S
    # Per model: how many this process's circuit breakers allow now (a model absent:
    # its circuit is open; None: no breaker says anything, every model may claim).
    circuit_caps: Mapping[str, int] | None = None
    # Per model: its rpm/tpm budget and concurrency ceiling (regions file limits).
    budgets: Mapping[str, Budget] = field(default_factory=dict)
    # Schedule-to-start (claim step 4): an idle region takes other regions' failover-any
    # work queued this long (None: never).
    schedule_to_start_s: float | None = None

    @property
    def expires(self) -> float:
        return self.now + self.lease_s

    @property
    def handoff_due(self) -> float:
        """A failover-any retry that failed in this region is its own again once it has
        been due since this time (``now - retry_handoff_s``)."""
        return self.now - max(0.0, self.retry_handoff_s)

    @property
    def stale_before(self) -> float | None:
        """Queued work created before this time has waited past schedule-to-start."""
        s = self.schedule_to_start_s
        return None if s is None or s <= 0 else self.now - s

    @property
    def empty(self) -> bool:
        """Nothing can be claimed: no slot asked for, or a region serving no model."""
        return self.limit <= 0 or not self.region.models

    def budget(self, model: str) -> Budget:
        return self.budgets.get(model, Budget())

    def max_limit(self, model: str) -> int:
        """The model's concurrency ceiling here (adaptive concurrency never goes above)."""
        cap = self.budget(model).concurrency
        return self.region.concurrency if cap is None else min(cap, self.region.concurrency)


@dataclass(frozen=True)
class ClaimGroup:
    """Models claimed together in one pick, at most ``limit`` of them; ``budgeted``: the
    picked executions' estimated tokens must fit the model's buckets (``pacing.take``)."""

    models: tuple[str, ...]
    limit: int
    budgeted: bool = False


def counts_in_flight(request: ClaimRequest, paces: Mapping[str, Pace]) -> bool:
    """Whether plan_claim needs each model's calls in flight: only when some model may
    run fewer than the region's slots (adaptive concurrency cut, or a model limit);
    otherwise the region's free slots are the tighter bound (a query saved per claim)."""
    return any(p.limit < request.region.concurrency for p in paces.values())


def plan_claim(
    request: ClaimRequest, paces: dict[str, Pace], in_flight: Mapping[str, int], free: int
) -> tuple[list[ClaimGroup], dict[str, Allowance]]:
    """Which models a claim may take work for, and how many each, given the shared pacing
    state (``paces``, refilled to ``request.now`` in place), each model's calls in flight
    here, and ``free`` region slots. Backpressure (not_before), adaptive concurrency,
    the budgets and this process's circuits hold a model back on its own: the others
    still claim. Models held by nothing are picked together, after the limited ones
    (which would otherwise lose every free slot to them). Returns the groups, and for
    each model held back, why (``held``)."""
    limited: list[ClaimGroup] = []
    open_models: list[str] = []
    held: dict[str, Allowance] = {}
    for model in sorted(request.region.models):
        cap = free
        if request.circuit_caps is not None:
            cap = min(cap, request.circuit_caps.get(model, 0))
        if cap <= 0:
            held[model] = Allowance(0, "circuit_open")
            continue
        budget = request.budget(model)
        allowed, paces[model] = pacing.allowance(
            paces[model], budget, in_flight.get(model, 0), cap, request.now
        )
        if allowed.calls <= 0:
            held[model] = allowed
        elif allowed.calls >= free and not budget.limited:
            open_models.append(model)
        else:
            limited.append(ClaimGroup((model,), allowed.calls, budget.limited))
    groups = limited + ([ClaimGroup(tuple(open_models), free)] if open_models else [])
    return groups, held


# -- hedged calls (dispatcher/hedging.py runs them) -------------------------------------


def hedgeable(params: Mapping[str, Any]) -> bool:
    """A second copy of a call may stand in for the first only if both would give the same
    kind of answer: never for temperature > 0 without a seed (two samples, not one)."""
    temperature = float(params.get("temperature") or 0.0)
    return temperature <= 0.0 or params.get("seed") is not None


def hedge_budget(total: int, max_fraction: float) -> int:
    """How many hedges a job of ``total`` executions may send in all (every process):
    never more than ``max_fraction`` extra calls, rounded down (a small job gets none)."""
    return int(total * max_fraction + 1e-9)


def in_tail(unfinished: int, total: int, tail_fraction: float) -> bool:
    """A job's remaining calls are few: at most ``tail_fraction`` of its executions (and at
    least its last one) are not final yet."""
    return 0 < unfinished <= max(1, int(total * tail_fraction + 1e-9))


def straggling(elapsed_s: float, p95_s: float | None) -> bool:
    """A call has run longer than its (region, model)'s observed p95 (None: too few
    observations to tell, never a straggler)."""
    return p95_s is not None and elapsed_s > p95_s


def hedge_regions(failover: Failover, region: str, serving: Sequence[str]) -> list[str]:
    """Where a straggler's hedge may run, in order of preference: its own region only for
    failover "none" (a comparison never mixes regions); for "any", the other regions
    serving the model first (the straggler may be its region's trouble), then its own."""
    if failover is Failover.NONE:
        return [region]
    return [*sorted(r for r in serving if r != region), region]


@dataclass(frozen=True)
class HedgeRequest:
    """A hedge of one leased execution: a second call in ``claim.region`` (limit 1, the
    hedge region's budgets and circuits), while the lease ``token`` is still current,
    within the job's budget of ``max_hedges``."""

    claim: ClaimRequest
    execution_id: int
    token: str
    model: str
    max_hedges: int

    def for_model(self) -> ClaimRequest:
        """The claim request plan_claim decides the hedge with: this model alone, one slot."""
        region = replace(self.claim.region, models=frozenset({self.model}))
        return replace(self.claim, region=region, limit=1)


# -- the claim order ------------------------------------------------------------------


class ClaimQueues(Protocol):
    """The candidate queries of one claim, answered by a store inside its transaction
    (each returns execution ids in the order given; on PostgreSQL they lock what they
    return). The eligibility conditions are each query's WHERE clause:

    - ``global_retries``: retry_wait, due, failover any, model served here, last failed
      in another region; oldest failure first;
    - ``own_retries``: retry_wait, due, requested here or (failover any and last failed
      here), not in ``taken``; a failover-any retry that last failed here only once due
      since ``handoff_due``; earliest due first;
    - ``queued_tenants`` / ``leased_by_tenant``: tenants with queued work requested here /
      executions leased here per tenant;
    - ``tenant_new_work``: the tenant's queued work requested here for a model served
      here, by priority (high first), job age, job, question order;
    - ``stale_queued``: schedule-to-start, queued, failover any, requested in another
      region, created before ``ClaimRequest.stale_before``, model served here;
      oldest first (empty, without a query, when schedule-to-start is off).
    """

    def global_retries(self, n: int) -> list[int]: ...

    def own_retries(self, taken: list[int], n: int) -> list[int]: ...

    def queued_tenants(self) -> list[str]: ...

    def leased_by_tenant(self) -> dict[str, int]: ...

    def tenant_new_work(self, tenant: str, n: int) -> list[int]: ...

    def stale_queued(self, n: int) -> list[int]: ...


def pick(queues: ClaimQueues, free: int, tenant_batch: int) -> list[tuple[int, Source]]:
    """The claim order (see Store.claim): the ids to lease for ``free`` slots, each with
    the queue it came from. 1. the global retry queue; 2. the region's own retries;
    3. new work, round-robin across tenants (fewest in flight here first); 4. with slots
    still free (the region is idle), other regions' failover-any work queued longer than
    schedule-to-start (DESIGN.md, Timeouts): an idle region serving the model takes it."""
    picked = [(i, Source.GLOBAL_RETRY) for i in queues.global_retries(free)]
    if len(picked) < free:
        own = queues.own_retries([i for i, _ in picked], free - len(picked))
        picked += [(i, Source.OWN_RETRY) for i in own]
    if len(picked) < free:
        tenants = order_tenants(queues.queued_tenants(), queues.leased_by_tenant())
        new = round_robin(tenants, queues.tenant_new_work, tenant_batch, free - len(picked))
        picked += [(i, Source.NEW) for i in new]
    if len(picked) < free:
        stale = queues.stale_queued(free - len(picked))
        picked += [(i, Source.STALE) for i in stale]
    return picked


def order_tenants(tenants: Sequence[str], leased: Mapping[str, int]) -> list[str]:
    """Tenants with fewer executions leased in the region first, then by name,
    so a tenant with a big backlog cannot starve a newcomer."""
    return sorted(tenants, key=lambda t: (leased.get(t, 0), t))


def round_robin(
    tenants: Sequence[str], fetch: Callable[[str, int], list[T]], per_tenant: int, limit: int
) -> list[T]:
    """Interleave each tenant's next items (tenant1 #1, tenant2 #1, ..., tenant1 #2, ...)
    and return the first ``limit``. ``fetch(tenant, n)`` returns up to n of the
    tenant's items in its own order. Stops asking tenants once the first round
    alone fills ``limit``: later tenants could not make the cut."""
    if limit <= 0 or per_tenant <= 0:
        return []
    batches: list[list[T]] = []
    for tenant in tenants:
        if len(batches) >= limit:
            break
        batch = fetch(tenant, min(per_tenant, limit))
        if batch:
            batches.append(batch)
    out: list[T] = []
    for rank in range(max((len(b) for b in batches), default=0)):
        out.extend(b[rank] for b in batches if rank < len(b))
    return out[:limit]


# -- what a finished, lost or returned lease becomes ----------------------------------


def exhausted(attempts: int, max_attempts: int) -> bool:
    """Dead-letter on max attempts: attempt number ``attempts`` was the last allowed."""
    return attempts >= max_attempts


@dataclass(frozen=True)
class Transition:
    """The state an execution moves to, and the times that go with it."""

    state: State
    due_at: float | None = None  # when a retry_wait is due (None otherwise)
    finished_at: float | None = None  # set for a final state
    executed_region: str | None = None  # release only: the region it counts against


def after_failure(retry_at: float | None, cancelled: bool, now: float) -> Transition:
    """A failed attempt, given the scheduler's decision (``retry_at`` None: give up).
    Cancel finality: a failure in a cancelled job is final, never retried."""
    if retry_at is None:
        return Transition(State.DEAD, finished_at=now)
    if cancelled:
        return Transition(State.CANCELLED, finished_at=now)
    return Transition(State.RETRY_WAIT, due_at=retry_at)


def after_lease_expired(
    attempts: int, max_attempts: int, cancelled: bool, now: float, due_at: float
) -> Transition:
    """An expired lease (reap): the attempt counts as failed with LEASE_EXPIRED_ERROR.
    Cancelled job: final; last attempt used: dead; otherwise retried at ``due_at``."""
    if cancelled:
        return Transition(State.CANCELLED, finished_at=now)
    if exhausted(attempts, max_attempts):
        return Transition(State.DEAD, finished_at=now)
    return Transition(State.RETRY_WAIT, due_at=due_at)


def after_release(
    claimed_from: str | None, cancelled: bool, last_region: str | None, now: float
) -> Transition:
    """A lease given back unused (shutdown): back to the queue it was claimed from, as if
    never claimed (the store gives the attempt back), or cancelled if its job was. Work
    taken by schedule-to-start goes back to its own region's queue, as new work does."""
    new = claimed_from in (Source.NEW.value, Source.STALE.value)
    executed_region = None if new else last_region
    if cancelled:
        return Transition(
            State.CANCELLED,
            due_at=None if new else now,
            finished_at=now,
            executed_region=executed_region,
        )
    if new:
        return Transition(State.QUEUED)
    return Transition(State.RETRY_WAIT, due_at=now, executed_region=executed_region)
