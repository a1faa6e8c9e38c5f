"""The in-memory store: the Store interface on Python dicts, for unit tests (and
``ES_DATABASE_URL=memory://``, one process, nothing kept).

Its state is inspectable: ``rows`` (execution id -> ``ExecutionRow``, every column the
SQL stores keep, lease token included), ``jobs``, ``attempts`` and ``circuits``, so a
test can look at what a step did without SQL. It runs the same behavioural suite as
SQLite and PostgreSQL (tests/integration/test_store.py), which keeps it honest.

The decisions are rules.py's, as in the SQL stores; the candidate filters of a claim
(``_Queues``) are the WHERE clauses of the named queries, written as Python. One lock
serialises every operation, as SQLite's write lock does.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from executor_service.dispatcher import rules
from executor_service.dispatcher.pacing import Pace
from executor_service.dispatcher.rules import ClaimRequest
from executor_service.dispatcher.store import records
from executor_service.dispatcher.store.base import (
    Attempt,
    Claims,
    Execution,
    Failover,
    IdempotencyConflict,
    Job,
    NewJob,
    QueueStats,
    RegionQueue,
    RegionSpec,
    State,
    Store,
    StoreError,
)
from executor_service.dispatcher.store.memory_claims import MemoryPacing, _Queues
from executor_service.dispatcher.store.memory_hedges import MemoryHedges, Seat
from executor_service.dispatcher.store.memory_workbench import WorkbenchOps


def _json(value: Any) -> Any:
    """A value as a JSON column gives it back: a fresh copy, tuples as lists."""
    return None if value is None else json.loads(json.dumps(value))


@dataclass
class ExecutionRow:
    """One execution with every column of the SQL stores' executions table."""

    id: int
    job_id: str
    tenant: str
    question_index: int
    question: str
    model: str
    requested_region: str
    max_attempts: int
    failover: str
    priority: int
    job_created_at: float
    created_at: float
    state: str = State.QUEUED.value
    attempts: int = 0
    executed_region: str | None = None
    due_at: float | None = None
    failed_at: float | None = None
    last_region: str | None = None
    last_error: dict[str, Any] | None = None
    output: str | None = None
    result: dict[str, Any] | None = None
    finished_at: float | None = None
    lease_token: str | None = None
    lease_expires_at: float | None = None
    leased_by: str | None = None
    leased_at: float | None = None
    claimed_from: str | None = None
    deferrals: int = 0
    sample: int = 0
    messages: list[dict[str, str]] | None = None
    attempt_base: int = 0
    hedges: int = 0
    hedged_lease: str | None = None

    def holds(self, token: str) -> bool:
        return self.state == State.LEASED.value and self.lease_token == token

    @property
    def call_number(self) -> int:
        """The current lease's call number (the SQL stores' call_number): a hedge of
        this lease has the next one."""
        return (
            self.attempts + self.deferrals + self.hedges - (self.hedged_lease == self.lease_token)
        )


@dataclass
class JobRow:
    job: Job
    request_hash: str
    cancelled: bool = False
    expired: bool = False


@dataclass
class MemoryStore(WorkbenchOps, MemoryHedges, MemoryPacing, Store):
    """The Store in this process's memory. Thread-safe (one lock)."""

    rows: dict[int, ExecutionRow] = field(default_factory=dict)
    jobs: dict[str, JobRow] = field(default_factory=dict)
    attempts: dict[int, list[Attempt]] = field(default_factory=dict)
    circuits: dict[str, tuple[str, float | None]] = field(default_factory=dict)
    pace_rows: dict[tuple[str, str], Pace] = field(default_factory=dict)  # (region, model)
    seats: dict[str, Seat] = field(default_factory=dict)  # hedge_seats, by token
    closed: bool = False
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    _next_id: int = 1

    # -- lifecycle ------------------------------------------------------------
    def migrate(self) -> None:
        """Nothing to migrate."""

    def close(self) -> None:
        self.closed = True

    def _check_open(self) -> None:
        if self.closed:
            raise StoreError("the memory store is closed")

    def _where(self, keep: Callable[[ExecutionRow], bool]) -> Iterator[ExecutionRow]:
        return (r for r in self.rows.values() if keep(r))

    # -- jobs -----------------------------------------------------------------
    def create_job(self, job: NewJob, now: float) -> tuple[Job, bool]:
        with self._lock:
            self._check_open()
            if job.idempotency_key is not None:
                for existing in self.jobs.values():
                    same = existing.job.tenant == job.tenant
                    if same and existing.job.idempotency_key == job.idempotency_key:
                        if existing.request_hash != job.request_hash:
                            raise IdempotencyConflict(
                                f"idempotency key {job.idempotency_key!r} was used for "
                                "another request"
                            )
                        return self._job(existing), False
            created = Job(
                id=records.new_job_id(),
                tenant=job.tenant,
                created_at=now,
                failover=Failover(job.failover),
                max_attempts=job.max_attempts,
                priority=job.priority,
                questions=_json(job.questions),
                models=_json(job.models),
                regions_by_model=_json(job.regions_by_model),
                params=_json(job.params),
                idempotency_key=job.idempotency_key,
                cancelled=False,
                total=records.count_executions(job),
                deadline_at=None if job.deadline_s is None else now + job.deadline_s,
                **{k: _json(getattr(job, k)) for k in ("samples", "name", "tags")},
            )
            self.jobs[created.id] = JobRow(created, job.request_hash)
            for index, question, model, region, sample, messages in records.expand(job):
                row = ExecutionRow(
                    sample=sample,
                    messages=_json(messages),
                    id=self._next_id,
                    job_id=created.id,
                    tenant=job.tenant,
                    question_index=index,
                    question=question,
                    model=model,
                    requested_region=region,
                    max_attempts=job.max_attempts,
                    failover=Failover(job.failover).value,
                    priority=job.priority,
                    job_created_at=now,
                    created_at=now,
                )
                self.rows[row.id] = row
                self._next_id += 1
            return self._job(self.jobs[created.id]), True

    @staticmethod
    def _job(row: JobRow) -> Job:
        return replace(row.job, cancelled=row.cancelled)

    def get_job(self, tenant: str, job_id: str) -> Job | None:
        with self._lock:
            self._check_open()
            row = self.jobs.get(job_id)
            return None if row is None or row.job.tenant != tenant else self._job(row)

    def job_counts(self, job_id: str) -> dict[str, dict[str, int]]:
        with self._lock:
            self._check_open()
            counted = Counter(
                (r.requested_region, r.state) for r in self._where(lambda r: r.job_id == job_id)
            )
        counts: dict[str, dict[str, int]] = {}
        for (region, state), n in counted.items():
            counts.setdefault(region, {})[state] = n
        return counts

    def _execution(self, r: ExecutionRow, with_attempts: bool) -> Execution:
        attempts = (
            sorted(self.attempts.get(r.id, []), key=lambda a: a.number) if with_attempts else []
        )
        return records.execution_from_row(vars(r), _json, attempts)

    def cancel_job(self, tenant: str, job_id: str, now: float) -> int:
        with self._lock:
            self._check_open()
            job = self.jobs.get(job_id)
            if job is None or job.job.tenant != tenant:
                return 0
            job.cancelled = True
            waiting = {State.QUEUED.value, State.RETRY_WAIT.value}
            cancelled = 0
            for r in self._where(lambda r: r.job_id == job_id and r.state in waiting):
                r.state, r.finished_at = State.CANCELLED.value, now
                cancelled += 1
            return cancelled

    def job_finished(self, job_id: str) -> bool:
        with self._lock:
            self._check_open()
            return all(State(r.state).final for r in self._where(lambda r: r.job_id == job_id))

    # -- scheduling -----------------------------------------------------------
    def claim(self, request: ClaimRequest) -> Claims:
        if request.empty:
            return Claims()
        region = request.region.name
        with self._lock:
            self._check_open()
            leased = sum(1 for _ in self._where(lambda r: self._leased_in(r, region)))
            leased += self._seats_in(region)
            free = min(request.limit, request.region.concurrency - leased)
            if free <= 0:
                return Claims()
            picked, held = self._paced_pick(request, free)
            claims = Claims(held=held)
            for execution_id, source, reserved in picked:
                r = self.rows[execution_id]
                token = records.new_token()
                r.state, r.attempts, r.lease_token = State.LEASED.value, r.attempts + 1, token
                r.lease_expires_at, r.leased_by, r.leased_at = (
                    request.expires,
                    request.worker,
                    request.now,
                )
                r.executed_region, r.claimed_from = region, source.value
                job = self.jobs[r.job_id].job
                claims.append(
                    records.claim_from_row(
                        vars(r),
                        loads=_json,
                        token=token,
                        source=source.value,
                        region=region,
                        params=_json(job.params),
                        lease_expires_at=request.expires,
                        reserved_tokens=reserved,
                        deadline_at=job.deadline_at,
                    )
                )
            return claims

    def _queues(self, request: ClaimRequest, models: frozenset[str]) -> rules.ClaimQueues:
        return _Queues(self, request, models)

    @staticmethod
    def _leased_in(r: ExecutionRow, region: str) -> bool:
        return r.state == State.LEASED.value and r.executed_region == region

    def heartbeat(self, leases: Sequence[tuple[int, str]], now: float, lease_s: float) -> set[int]:
        held: set[int] = set()
        with self._lock:
            self._check_open()
            for execution_id, token in leases:
                r = self.rows.get(execution_id)
                if r is not None and r.holds(token):
                    # never shorter: the lease covers its call (rules.seat_lease_s)
                    r.lease_expires_at = max(r.lease_expires_at or 0.0, now + lease_s)
                    held.add(execution_id)
        return held

    def _held(self, execution_id: int, token: str) -> ExecutionRow | None:
        r = self.rows.get(execution_id)
        return r if r is not None and r.holds(token) else None

    def _record_attempt(
        self, r: ExecutionRow, started_at: float | None, now: float, error: Any
    ) -> None:
        assert r.executed_region is not None and started_at is not None
        self.attempts.setdefault(r.id, []).append(
            Attempt(
                r.call_number,
                r.executed_region,
                started_at,
                now,
                error is None,
                _json(error),
            )
        )

    def complete(
        self, execution_id: int, token: str, result: dict[str, Any], now: float, started_at: float
    ) -> bool:
        with self._lock:
            self._check_open()
            r = self._held(execution_id, token)
            if r is None:
                return False
            r.state, r.output, r.result = (
                State.SUCCEEDED.value,
                records.output_of(result),
                _json(result),
            )
            r.finished_at, r.lease_expires_at = now, None
            self._record_attempt(r, started_at, now, None)
            return True

    def _apply(self, r: ExecutionRow, to: rules.Transition, error: Any, now: float) -> None:
        """A failure's transition (fail, reap): the columns both write."""
        r.state, r.due_at, r.finished_at = to.state.value, to.due_at, to.finished_at
        r.failed_at, r.last_region, r.last_error = now, r.executed_region, _json(error)
        r.lease_expires_at = None

    def fail(
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
            self._apply(r, to, error, now)
            self._record_attempt(r, started_at, now, error)
            return True

    def release(self, execution_id: int, token: str, now: float) -> bool:
        with self._lock:
            self._check_open()
            r = self._held(execution_id, token)
            if r is None:
                return False
            to = rules.after_release(
                r.claimed_from, self.jobs[r.job_id].cancelled, r.last_region, now
            )
            r.state, r.due_at, r.finished_at = to.state.value, to.due_at, to.finished_at
            r.executed_region, r.attempts = to.executed_region, r.attempts - 1
            r.lease_token = r.lease_expires_at = r.leased_by = r.leased_at = r.claimed_from = None
            return True

    def reap_expired(self, now: float, max_backoff_s: float = 0.0) -> int:
        with self._lock:
            self._check_open()
            expired = sorted(
                self._where(
                    lambda r: (
                        r.state == State.LEASED.value
                        and r.lease_expires_at is not None
                        and r.lease_expires_at < now
                    )
                ),
                key=lambda r: r.id,
            )
            for r in expired:
                cancelled = self.jobs[r.job_id].cancelled
                to = rules.after_lease_expired(
                    r.attempts, r.max_attempts, cancelled, now, now + max_backoff_s
                )
                self._apply(r, to, rules.LEASE_EXPIRED_ERROR, now)
                self._record_attempt(r, r.leased_at, now, rules.LEASE_EXPIRED_ERROR)
            self._seats_expired(now)
            return len(expired)

    def divert_queued(self, region: str, now: float, model: str | None = None) -> int:
        with self._lock:
            self._check_open()
            moved = 0
            for r in self._where(
                lambda r: (
                    r.state == State.QUEUED.value
                    and r.requested_region == region
                    and r.failover == rules.DIVERTED_FAILOVER.value
                    and (model is None or r.model == model)
                )
            ):
                r.state, r.due_at, r.failed_at, r.last_region = (
                    State.RETRY_WAIT.value,
                    now,
                    now,
                    region,
                )
                moved += 1
            return moved

    # -- regions --------------------------------------------------------------
    def set_circuit(self, region: str, state: str, open_until: float | None) -> None:
        records.check_circuit_state(state)
        with self._lock:
            self._check_open()
            self.circuits[region] = (state, open_until)

    def queue_stats(self, now: float, regions: Sequence[RegionSpec]) -> QueueStats:
        with self._lock:
            self._check_open()
            rows = list(self.rows.values())
            queues = []
            for spec in regions:
                name = spec.name
                circuit, open_until = self.circuits.get(name, ("closed", None))
                queues.append(
                    RegionQueue(
                        region=name,
                        queued=sum(
                            r.state == State.QUEUED.value and r.requested_region == name
                            for r in rows
                        ),
                        retry_wait=sum(
                            r.state == State.RETRY_WAIT.value
                            and name in (r.requested_region, r.last_region)
                            for r in rows
                        ),
                        in_flight=sum(self._leased_in(r, name) for r in rows),
                        circuit=circuit,
                        circuit_open_until=open_until,
                        paces=[p for (rg, _), p in sorted(self.pace_rows.items()) if rg == name],
                    )
                )
            return QueueStats(
                global_retry=sum(
                    r.state == State.RETRY_WAIT.value and r.failover == Failover.ANY.value
                    for r in rows
                ),
                regions=queues,
                dead=sum(r.state == State.DEAD.value for r in rows),
            )
