"""The operations the SQLite and PostgreSQL stores run the same way, written once.

Both stores keep their SQL as named queries (``sql/queries_<dialect>.sql``) and
run them with named parameters through a DB-API handle (a ``sqlite3.Connection``,
a psycopg ``Cursor``) that returns dict-like rows. Wherever the two differ only
in the text of a query, in how a JSON value is read and written, and in how a
transaction is opened, the operation lives here, on top of these hooks:

- ``queries``: the store's named queries (``common.load_queries``);
- ``_loads`` / ``_dumps``: a JSON column's value as Python / a JSON parameter;
- ``_transaction(write)``: one transaction, yielding the handle. ``write`` says it
  will write: SQLite takes the write lock up front (``BEGIN IMMEDIATE``),
  PostgreSQL ignores it (row locks do that job);
- ``_insert_job``, ``_insert_executions``, ``_own_retries``, ``_queue_regions``:
  the steps of create_job, claim (step 2) and queue_stats whose SQL differs in
  shape, not only in dialect.

The claim order (``_pick``) is written here once too. What each store keeps is
where the two really differ: claim itself (a region advisory lock and batch
lease against ``BEGIN IMMEDIATE`` and a lease per row), heartbeat, fail, release
and reap (PostgreSQL locks the job row before the execution), migrations and
connection handling.
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from executor_service.dispatcher.store import common
from executor_service.dispatcher.store.base import (
    Attempt,
    Execution,
    IdempotencyConflict,
    Job,
    NewJob,
    QueueStats,
    RegionQueue,
    RegionSpec,
    Store,
)


class SQLResult(Protocol):
    """What running a statement gives back (``sqlite3.Cursor``, psycopg ``Cursor``)."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class SQLHandle(Protocol):
    """What a transaction yields: runs one statement with named parameters."""

    def execute(self, query: str, params: Mapping[str, Any] = ..., /) -> SQLResult: ...


DB = TypeVar("DB", bound=SQLHandle)


class SQLStore(Store, Generic[DB]):
    """The Store operations common to the SQL stores; ``DB`` is the handle type
    their transactions yield, so each store's hooks get its own handle."""

    queries: ClassVar[Mapping[str, str]]

    # -- hooks ----------------------------------------------------------------
    @staticmethod
    @abstractmethod
    def _loads(value: Any) -> Any:
        """A JSON column's value as read from the database, as Python (None stays None)."""

    @staticmethod
    @abstractmethod
    def _dumps(value: Any) -> Any:
        """A Python value as the parameter for a JSON column."""

    @abstractmethod
    def _transaction(self, write: bool = False) -> AbstractContextManager[DB]:
        """One transaction (committed on success, rolled back on error) yielding the
        handle, and the one place driver errors become StoreError. ``write``: the
        transaction writes, so a store that locks the database takes its lock first."""

    @abstractmethod
    def _insert_job(self, db: DB, job: NewJob, args: dict[str, Any]) -> tuple[common.Row, bool]:
        """Insert the jobs row (``args`` are the insert_job parameters) and return it
        with True, or, if the tenant already used ``job.idempotency_key``, return that
        job's row with False instead."""

    @abstractmethod
    def _insert_executions(self, db: DB, rows: Iterable[tuple[Any, ...]]) -> None:
        """Insert new executions, rows in ``common.NEW_EXECUTION_COLUMNS`` order."""

    @abstractmethod
    def _queue_regions(self, db: DB, names: list[str]) -> list[common.Row]:
        """The queue_region counts and circuit of each region, in ``names`` order."""

    @abstractmethod
    def _own_retries(self, db: DB, args: dict[str, Any], taken: list[int], n: int) -> list[int]:
        """Claim step 2: up to ``n`` of the region's own due retries (``args`` are the
        claim's parameters), not in ``taken``, in claim order; a store whose
        claimers run concurrently locks each one it returns."""

    @property
    def _logger(self) -> logging.Logger:
        """The logger of the concrete store's module, so its records keep their name."""
        return logging.getLogger(type(self).__module__)

    # -- jobs -----------------------------------------------------------------
    def create_job(self, job: NewJob, now: float) -> tuple[Job, bool]:
        args = {
            **vars(job),
            "id": common.new_job_id(),
            "failover": job.failover.value,
            "questions": self._dumps(job.questions),
            "models": self._dumps(job.models),
            "regions_by_model": self._dumps(job.regions_by_model),
            "params": self._dumps(job.params),
            "total": common.count_executions(job),
            "now": now,
        }
        with self._transaction(write=True) as db:
            row, created = self._insert_job(db, job, args)
            if not created:
                if row["request_hash"] != job.request_hash:
                    raise IdempotencyConflict(
                        f"idempotency key {job.idempotency_key!r} was used for another request"
                    )
                return common.job_from_row(row, self._loads), False
            self._insert_executions(db, common.execution_rows(job, row["id"], now))
        self._logger.info("job created", extra={"job_id": row["id"], "tenant": job.tenant})
        return common.job_from_row(row, self._loads), True

    def get_job(self, tenant: str, job_id: str) -> Job | None:
        with self._transaction() as db:
            row = db.execute(self.queries["get_job"], {"id": job_id, "tenant": tenant}).fetchone()
        return None if row is None else common.job_from_row(row, self._loads)

    def job_counts(self, job_id: str) -> dict[str, dict[str, int]]:
        with self._transaction() as db:
            rows = db.execute(self.queries["job_counts"], {"job_id": job_id}).fetchall()
        counts: dict[str, dict[str, int]] = {}
        for row in rows:
            counts.setdefault(row["requested_region"], {})[row["state"]] = row["n"]
        return counts

    def executions(self, job_id: str, with_attempts: bool = True) -> list[Execution]:
        with self._transaction() as db:
            rows = db.execute(self.queries["list_executions"], {"job_id": job_id}).fetchall()
            attempts: dict[int, list[Attempt]] = {}
            if with_attempts:
                for a in db.execute(self.queries["list_attempts"], {"job_id": job_id}):
                    attempts.setdefault(a["execution_id"], []).append(
                        common.attempt_from_row(a, self._loads)
                    )
        return [common.execution_from_row(r, self._loads, attempts.get(r["id"], [])) for r in rows]

    def cancel_job(self, tenant: str, job_id: str, now: float) -> int:
        args = {"job_id": job_id, "tenant": tenant, "now": now}
        with self._transaction(write=True) as db:
            # The job row first: PostgreSQL's fail/release/reap lock it before the execution.
            if not db.execute(self.queries["cancel_job"], args).rowcount:
                return 0
            cancelled = db.execute(self.queries["cancel_executions"], args).rowcount
        self._logger.info("job cancelled", extra={"job_id": job_id, "cancelled": cancelled})
        return cancelled

    def job_finished(self, job_id: str) -> bool:
        with self._transaction() as db:
            row = db.execute(self.queries["job_unfinished"], {"job_id": job_id}).fetchone()
        return row is None

    # -- scheduling -----------------------------------------------------------
    def _pick(
        self, db: DB, args: dict[str, Any], free: int, tenant_batch: int
    ) -> list[tuple[int, str]]:
        """Claim steps 1-3 (see Store.claim): the ids to lease, with the queue each
        came from, in claim order. Run by each store's claim inside its transaction,
        after it has made the region's lease count its own; on PostgreSQL every
        query here locks the rows it returns (FOR UPDATE SKIP LOCKED)."""
        picked: list[tuple[int, str]] = [
            (r["id"], common.SOURCE_GLOBAL_RETRY)
            for r in db.execute(self.queries["global_retries"], {**args, "n": free})
        ]
        if len(picked) < free:
            own = self._own_retries(db, args, [i for i, _ in picked], free - len(picked))
            picked += [(i, common.SOURCE_OWN_RETRY) for i in own]
        if len(picked) < free:
            tenants = [r["tenant"] for r in db.execute(self.queries["queued_tenants"], args)]
            in_flight = {
                r["tenant"]: r["n"] for r in db.execute(self.queries["leased_by_tenant"], args)
            }

            def fetch(tenant: str, n: int) -> list[int]:
                query_args = {**args, "tenant": tenant, "n": n}
                return [r["id"] for r in db.execute(self.queries["tenant_new_work"], query_args)]

            new = common.round_robin(
                common.order_tenants(tenants, in_flight), fetch, tenant_batch, free - len(picked)
            )
            picked += [(i, common.SOURCE_NEW) for i in new]
        return picked

    def complete(
        self, execution_id: int, token: str, result: dict[str, Any], now: float, started_at: float
    ) -> bool:
        args = {
            "id": execution_id,
            "token": token,
            "output": common.output_of(result),
            "result": self._dumps(result),
            "now": now,
        }
        with self._transaction(write=True) as db:
            return self._finish_attempt(db, "complete", args, started_at, error=None)

    def _finish_attempt(
        self, db: DB, query: str, args: dict[str, Any], started_at: float, error: Any
    ) -> bool:
        """Apply a fenced complete/fail (the named ``query``, which returns the row's
        attempts and executed_region), then record the attempt it ended. ``error`` is
        the failure as a JSON parameter, None for a success."""
        row = db.execute(self.queries[query], args).fetchone()
        if row is None:
            return False
        attempt = {
            "id": args["id"],
            "number": row["attempts"],
            "region": row["executed_region"],
            "started_at": started_at,
            "now": args["now"],
            "ok": error is None,
            "error": error,
        }
        db.execute(self.queries["insert_attempt"], attempt)
        return True

    def divert_queued(self, region: str, now: float) -> int:
        with self._transaction(write=True) as db:
            args = {"region": region, "now": now}
            moved = db.execute(self.queries["divert_queued"], args).rowcount
        if moved:
            self._logger.info("diverted %d queued executions away from region %s", moved, region)
        return moved

    # -- regions --------------------------------------------------------------
    def set_circuit(self, region: str, state: str, open_until: float | None) -> None:
        common.check_circuit_state(state)
        with self._transaction(write=True) as db:
            args = {"region": region, "state": state, "open_until": open_until}
            db.execute(self.queries["set_circuit"], args)

    def queue_stats(self, now: float, regions: Sequence[RegionSpec]) -> QueueStats:
        names = [spec.name for spec in regions]
        with self._transaction() as db:
            totals = db.execute(self.queries["queue_totals"]).fetchone()
            rows = self._queue_regions(db, names)
        queues = [
            RegionQueue(
                region=name,
                queued=row["queued"],
                retry_wait=row["retry_wait"],
                in_flight=row["in_flight"],
                circuit=row["circuit"],
                circuit_open_until=row["open_until"],
            )
            for name, row in zip(names, rows, strict=True)
        ]
        return QueueStats(global_retry=totals["global_retry"], regions=queues, dead=totals["dead"])
