"""The workbench's operations on the SQL stores (paged ``executions``, ``list_jobs``,
``retry_job``), kept beside sql_store.py so each module stays under 500 lines. They
run the named queries ``list_executions_page``, ``list_attempts_of``, ``list_jobs``,
``retry_job``, ``retry_executions`` and ``uncancel_job`` of each dialect.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, ClassVar

from executor_service.dispatcher.store import records
from executor_service.dispatcher.store.models import (
    JOB_PHASES,
    Attempt,
    Execution,
    ExecutionKey,
    Job,
    JobQuery,
    RetryRequest,
)


class SQLWorkbenchOps:
    """Mixed into SQLStore, whose transaction, queries and JSON hooks it uses."""

    if TYPE_CHECKING:
        queries: ClassVar[Mapping[str, str]]

        def _transaction(self, write: bool = False) -> AbstractContextManager[Any]: ...

        @staticmethod
        def _loads(value: Any) -> Any: ...

        @staticmethod
        def _list(values: Sequence[Any]) -> Any: ...

        @property
        def _logger(self) -> logging.Logger: ...

    def executions(
        self,
        job_id: str,
        with_attempts: bool = True,
        after: ExecutionKey | None = None,
        limit: int | None = None,
    ) -> list[Execution]:
        paged = limit is not None or after is not None
        with self._transaction() as db:
            if paged:
                # A page is a range of the executions_results index: first, or after a key.
                args: dict[str, Any] = {"job_id": job_id, "limit": limit}
                if after is not None:
                    keys = ("after_question", "after_model", "after_region", "after_id")
                    args.update(zip(keys, after, strict=True))
                query = "list_executions_page" if after is None else "list_executions_after"
                rows = db.execute(self.queries[query], args).fetchall()
            else:
                rows = db.execute(self.queries["list_executions"], {"job_id": job_id}).fetchall()
            attempts: dict[int, list[Attempt]] = {}
            if with_attempts and rows:
                if paged:
                    ids = self._list([r["id"] for r in rows])
                    found = db.execute(self.queries["list_attempts_of"], {"ids": ids})
                else:
                    found = db.execute(self.queries["list_attempts"], {"job_id": job_id})
                for a in found:
                    attempts.setdefault(a["execution_id"], []).append(
                        records.attempt_from_row(a, self._loads)
                    )
        return [records.execution_from_row(r, self._loads, attempts.get(r["id"], [])) for r in rows]

    def list_jobs(self, query: JobQuery) -> list[Job]:
        phase = JOB_PHASES[query.state] if query.state is not None else {}
        args = {
            "tenant": query.tenant,
            "limit": query.limit,
            "after_created": None if query.after is None else query.after[0],
            "after_id": None if query.after is None else query.after[1],
            "name": query.name,
            **{k: phase.get(k) for k in ("cancelled", "unfinished", "started")},
        }
        with self._transaction() as db:
            rows = db.execute(self.queries["list_jobs"], args).fetchall()
        return [records.job_from_row(r, self._loads) for r in rows]

    def retry_job(self, request: RetryRequest) -> int:
        args = {
            "job_id": request.job_id,
            "tenant": request.tenant,
            "include_cancelled": request.include_cancelled,
            "regions": None if request.regions is None else self._list(list(request.regions)),
            "models": None if request.models is None else self._list(list(request.models)),
        }
        with self._transaction(write=True) as db:
            # The job row first: PostgreSQL's fail/release/reap lock it before the execution.
            job = db.execute(self.queries["retry_job"], args).fetchone()
            if job is None:
                return 0
            args["max_attempts"] = job["max_attempts"]
            requeued = db.execute(self.queries["retry_executions"], args).rowcount
            if requeued:
                db.execute(self.queries["uncancel_job"], args)
        self._logger.info("job retried", extra={"job_id": request.job_id, "requeued": requeued})
        return requeued
