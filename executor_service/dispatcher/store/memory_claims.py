"""The memory store's claim candidates and pacing (parts of ``MemoryStore``): its
``rules.ClaimQueues`` (``_Queues``: the named queries' WHERE clauses as Python), and
the steps of ``SQLStore._paced_pick``, ``defer``, ``update_pace`` and
``expire_deadlines`` on its dicts, with the same rules (``rules.plan_claim``,
``pacing.py``). Kept apart so memory.py stays under the module size."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from executor_service.dispatcher import pacing, rules
from executor_service.dispatcher.pacing import Pace
from executor_service.dispatcher.rules import ClaimRequest
from executor_service.dispatcher.store.models import Failover, State

if TYPE_CHECKING:
    from executor_service.dispatcher.store.memory import ExecutionRow, JobRow
    from executor_service.dispatcher.store.memory_hedges import Seat


class MemoryPacing:
    """Mixed into MemoryStore, whose state and helpers it uses."""

    rows: dict[int, ExecutionRow]
    jobs: dict[str, JobRow]
    pace_rows: dict[tuple[str, str], Pace]
    seats: dict[str, Seat]
    _lock: threading.RLock

    if TYPE_CHECKING:  # MemoryStore's

        def _check_open(self) -> None: ...

        def _where(self, keep: Callable[[ExecutionRow], bool]) -> Iterator[ExecutionRow]: ...

        def _held(self, execution_id: int, token: str) -> ExecutionRow | None: ...

        def _record_attempt(
            self, r: ExecutionRow, started_at: float | None, now: float, error: Any
        ) -> None: ...

        def _apply(self, r: ExecutionRow, to: rules.Transition, error: Any, now: float) -> None: ...

        def _queues(self, request: ClaimRequest, models: frozenset[str]) -> rules.ClaimQueues: ...

    @staticmethod
    def _leased_in(r: ExecutionRow, region: str) -> bool:
        return r.state == State.LEASED.value and r.executed_region == region

    def _pace(self, region: str, model: str, max_limit: int) -> Pace:
        pace = self.pace_rows.get((region, model)) or Pace.initial(region, model, max_limit)
        if pace.max_limit != max_limit:
            pace = pacing.with_max_limit(pace, max_limit)
        return pace

    def _paced_pick(
        self, request: ClaimRequest, free: int
    ) -> tuple[list[tuple[int, rules.Source, int]], dict[str, Any]]:
        """SQLStore._paced_pick on dicts (the same steps, the same rules)."""
        region = request.region.name
        paces = {
            m: self._pace(region, m, request.max_limit(m)) for m in sorted(request.region.models)
        }
        in_flight: Counter[str] = Counter()
        if rules.counts_in_flight(request, paces):
            in_flight.update(r.model for r in self._where(lambda r: self._leased_in(r, region)))
            in_flight.update(s.model for s in self.seats.values() if s.region == region)
        groups, held = rules.plan_claim(request, paces, in_flight, free)
        picked: list[tuple[int, rules.Source, int]] = []
        for group in groups:
            n = min(group.limit, free - len(picked))
            if n <= 0:
                break
            ids = rules.pick(
                self._queues(request, frozenset(group.models)), n, request.tenant_batch
            )
            if not group.budgeted:
                picked += [(i, source, 0) for i, source in ids]
                continue
            model = group.models[0]
            budget = request.budget(model)
            costs = [
                pacing.estimate_tokens(
                    len(self.rows[i].question),
                    self.jobs[self.rows[i].job_id].job.params.get("max_tokens"),
                )
                for i, _ in ids
            ]
            taken, paces[model] = pacing.take(paces[model], budget, costs)
            reserve = budget.tpm is not None
            picked += [
                (i, source, cost if reserve else 0)
                for (i, source), cost in zip(ids[:taken], costs[:taken], strict=True)
            ]
            if taken < len(ids):
                held[model] = pacing.Allowance(0, "budget")
        for model, pace in paces.items():
            self.pace_rows[(region, model)] = pace
        return picked, held

    def update_pace(
        self, region: str, model: str, max_limit: int, change: pacing.PaceChange
    ) -> Pace:
        with self._lock:
            self._check_open()
            pace = change(self._pace(region, model, max_limit))
            self.pace_rows[(region, model)] = pace
            return pace

    def paces(self, regions: Sequence[str]) -> list[Pace]:
        with self._lock:
            self._check_open()
            return [p for (region, _), p in sorted(self.pace_rows.items()) if region in regions]

    def expire_deadlines(self, now: float, job_ids: Sequence[str] | None = None) -> int:
        with self._lock:
            self._check_open()
            ended = 0
            waiting = {State.QUEUED.value, State.RETRY_WAIT.value}
            for job in self.jobs.values():
                if job_ids is not None:
                    if job.job.id not in job_ids:
                        continue
                elif job.expired or not rules.past_deadline(job.job.deadline_at, now):
                    continue
                job.expired = True
                job_id = job.job.id
                left = [r for r in self.rows.values() if r.job_id == job_id and r.state in waiting]
                for r in left:
                    r.state, r.finished_at, r.due_at = State.DEAD.value, now, None
                    r.last_error = rules.deadline_error(r.last_error)
                    ended += 1
            return ended

    def defer(
        self,
        execution_id: int,
        token: str,
        error: dict[str, Any],
        now: float,
        started_at: float,
        retry_at: float | None,
    ) -> bool:
        with self._lock:
            self._check_open()
            r = self._held(execution_id, token)
            if r is None:
                return False
            to = rules.after_failure(retry_at, self.jobs[r.job_id].cancelled, now)
            self._record_attempt(r, started_at, now, error)
            self._apply(r, to, error, now)
            r.attempts, r.deferrals = r.attempts - 1, r.deferrals + 1
            return True


class _Queues:
    """rules.ClaimQueues over the memory store's rows: the named queries' WHERE clauses
    (queries_sqlite.sql) as Python. Called with the store's lock held."""

    def __init__(
        self, store: MemoryPacing, request: ClaimRequest, models: frozenset[str] | None = None
    ) -> None:
        self.rows = list(store.rows.values())
        self.request = request
        self.region = request.region.name
        self.models = request.region.models if models is None else models

    def _retry_due(self, r: ExecutionRow, by: float) -> bool:
        return (
            r.state == State.RETRY_WAIT.value
            and r.due_at is not None
            and r.due_at <= by
            and r.model in self.models
        )

    def global_retries(self, n: int) -> list[int]:
        found = [
            r
            for r in self.rows
            if self._retry_due(r, self.request.now)
            and r.failover == Failover.ANY.value
            and r.last_region is not None
            and r.last_region != self.region
        ]
        found.sort(key=lambda r: (r.failed_at or 0.0, r.id))
        return [r.id for r in found[:n]]

    def own_retries(self, taken: list[int], n: int) -> list[int]:
        handoff_due, region, skip = self.request.handoff_due, self.region, set(taken)

        def requested_here(r: ExecutionRow) -> bool:
            return (
                self._retry_due(r, self.request.now)
                and r.requested_region == region
                and (
                    r.failover == Failover.NONE.value
                    or r.last_region != region
                    or (r.due_at is not None and r.due_at <= handoff_due)
                )
            )

        def failed_here(r: ExecutionRow) -> bool:
            return (
                self._retry_due(r, handoff_due)
                and r.last_region == region
                and r.failover == Failover.ANY.value
                and r.requested_region != region
            )

        found = [r for r in self.rows if r.id not in skip and (requested_here(r) or failed_here(r))]
        found.sort(key=lambda r: (r.due_at or 0.0, r.id))
        return [r.id for r in found[:n]]

    def _queued_here(self, r: ExecutionRow) -> bool:
        return r.state == State.QUEUED.value and r.requested_region == self.region

    def queued_tenants(self) -> list[str]:
        return sorted({r.tenant for r in self.rows if self._queued_here(r)})

    def leased_by_tenant(self) -> dict[str, int]:
        return dict(Counter(r.tenant for r in self.rows if MemoryPacing._leased_in(r, self.region)))

    def tenant_new_work(self, tenant: str, n: int) -> list[int]:
        found = [
            r
            for r in self.rows
            if self._queued_here(r) and r.tenant == tenant and r.model in self.models
        ]
        found.sort(key=lambda r: (-r.priority, r.job_created_at, r.job_id, r.question_index, r.id))
        return [r.id for r in found[:n]]

    def stale_queued(self, n: int) -> list[int]:
        stale_before = self.request.stale_before
        if stale_before is None:
            return []
        found = [
            r
            for r in self.rows
            if r.state == State.QUEUED.value
            and r.failover == Failover.ANY.value
            and r.created_at < stale_before
            and r.requested_region != self.region
            and r.model in self.models
        ]
        found.sort(key=lambda r: (r.created_at, r.id))
        return [r.id for r in found[:n]]
