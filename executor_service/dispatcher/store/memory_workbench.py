"""The workbench's operations on the memory store (paged ``executions``, ``GET /jobs``,
``POST /jobs/<id>/retry``), kept beside memory.py so each module stays under 500
lines: the same filters and updates as the named queries ``list_executions_page``,
``list_jobs`` and ``retry_executions``, over the memory store's rows.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from executor_service.dispatcher.store.models import (
    JOB_PHASES,
    Execution,
    ExecutionKey,
    Job,
    JobQuery,
    RetryRequest,
    State,
)

if TYPE_CHECKING:
    from executor_service.dispatcher.store.memory import ExecutionRow, JobRow


class WorkbenchOps:
    """Mixed into MemoryStore, whose rows, jobs and lock it uses."""

    if TYPE_CHECKING:
        rows: dict[int, ExecutionRow]
        jobs: dict[str, JobRow]
        _lock: threading.RLock

        def _check_open(self) -> None: ...

        def _where(self, keep: Callable[[ExecutionRow], bool]) -> Iterator[ExecutionRow]: ...

        @staticmethod
        def _job(row: JobRow) -> Job: ...

        def _execution(self, r: ExecutionRow, with_attempts: bool) -> Execution: ...

    def executions(
        self,
        job_id: str,
        with_attempts: bool = True,
        after: ExecutionKey | None = None,
        limit: int | None = None,
    ) -> list[Execution]:
        def key(r: ExecutionRow) -> ExecutionKey:
            return (r.question_index, r.model, r.requested_region, r.id)

        with self._lock:
            self._check_open()
            rows = sorted(
                self._where(lambda r: r.job_id == job_id and (after is None or key(r) > after)),
                key=key,
            )
            return [self._execution(r, with_attempts) for r in rows[:limit]]

    def list_jobs(self, query: JobQuery) -> list[Job]:
        phase = JOB_PHASES[query.state] if query.state is not None else {}
        with self._lock:
            self._check_open()
            found = []
            for row in self.jobs.values():
                job = self._job(row)
                if job.tenant != query.tenant:
                    continue
                if query.after is not None and (job.created_at, job.id) >= query.after:
                    continue
                if query.name is not None and query.name.lower() not in (job.name or "").lower():
                    continue
                states = [r.state for r in self.rows.values() if r.job_id == job.id]
                facts = {
                    "cancelled": job.cancelled,
                    "unfinished": any(not State(st).final for st in states),
                    "started": any(st != State.QUEUED.value for st in states),
                }
                if any(want is not None and facts[k] != want for k, want in phase.items()):
                    continue
                found.append(job)
            found.sort(key=lambda j: (j.created_at, j.id), reverse=True)
            return found[: query.limit]

    def retry_job(self, request: RetryRequest) -> int:
        again = {State.DEAD.value}
        if request.include_cancelled:
            again.add(State.CANCELLED.value)
        with self._lock:
            self._check_open()
            job = self.jobs.get(request.job_id)
            if job is None or job.job.tenant != request.tenant:
                return 0
            requeued = 0
            for r in self._where(
                lambda r: (
                    r.job_id == request.job_id
                    and r.state in again
                    and (request.regions is None or r.requested_region in request.regions)
                    and (request.models is None or r.model in request.models)
                )
            ):
                r.state, r.attempt_base = State.QUEUED.value, r.attempts
                r.max_attempts = r.attempts + job.job.max_attempts
                r.executed_region = r.last_region = r.due_at = r.failed_at = None
                r.last_error = r.output = r.result = r.finished_at = None
                r.lease_token = r.lease_expires_at = r.leased_by = r.leased_at = None
                r.claimed_from = None
                requeued += 1
            if requeued:
                job.cancelled = False
            return requeued
