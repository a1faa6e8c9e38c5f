"""The SQLite store: the embedded default, for a dispatcher on one host.

One connection per store, guarded by a lock, serves every thread of the
process (the scheduler calls the store from several threads). SQLite allows
one writer at a time anyway, and a lock in the process is cheaper and fairer
than connections retrying SQLITE_BUSY, whose busy handler sleeps in coarse
steps. Other processes on the same file (an API process, a CLI) are handled by
WAL mode (readers never block the writer) and ``busy_timeout``.

Every write transaction starts with ``BEGIN IMMEDIATE``: it takes the
database's write lock up front, so a read-then-write step such as claim
(count the region's leases, pick executions, lease them) is atomic across
processes and a region can never be given more than its slots.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from executor_service.dispatcher.store import common
from executor_service.dispatcher.store.base import (
    DEFAULT_RETRY_HANDOFF_S,
    Claim,
    Execution,
    IdempotencyConflict,
    Job,
    NewJob,
    QueueStats,
    RegionQueue,
    RegionSpec,
    Store,
    StoreError,
)

logger = logging.getLogger(__name__)

Q = common.load_queries("sqlite")


def _dict_row(cursor: sqlite3.Cursor, row: tuple[Any, ...]) -> dict[str, Any]:
    return {col[0]: value for col, value in zip(cursor.description, row, strict=True)}


def _loads(value: Any) -> Any:
    return None if value is None else json.loads(value)


def _dumps(value: Any) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"))


def _marks(values: Sequence[Any]) -> str:
    return ",".join("?" * len(values))


def _json_list(values: Sequence[Any]) -> str:
    """A list parameter, read in SQL with json_each (keeps the queries static)."""
    return json.dumps(list(values))


def _statements(script: str) -> Iterator[str]:
    """Split a migration into statements (each ending a line with ';'), so it can run
    inside our own transaction: ``executescript`` would commit first."""
    buffer = ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            yield buffer
            buffer = ""
    leftover = [ln for ln in buffer.splitlines() if ln.strip() and not ln.strip().startswith("--")]
    if leftover:
        raise StoreError(f"incomplete SQL statement at the end of a migration: {buffer!r}")


class SQLiteStore(Store):
    """The Store on one SQLite file (or ``:memory:`` for tests)."""

    def __init__(self, path: str, *, busy_timeout_s: float = 10.0) -> None:
        self.path = path
        self._lock = threading.RLock()
        in_memory = path == ":memory:" or path.startswith("file::memory:")
        try:
            if not in_memory and not path.startswith("file:"):
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(
                path,
                isolation_level=None,  # we issue BEGIN IMMEDIATE / COMMIT ourselves
                check_same_thread=False,  # shared by threads, serialised by self._lock
                timeout=busy_timeout_s,
                uri=path.startswith("file:"),
            )
            self._conn.row_factory = _dict_row
            if not in_memory:
                self._conn.execute("PRAGMA journal_mode=WAL")
            # FULL: a job acknowledged to a client survives a power cut, not just a crash.
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
            self._conn.execute("PRAGMA foreign_keys=ON")
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open the SQLite store {path!r}: {exc}") from exc

    def __repr__(self) -> str:
        return f"SQLiteStore({self.path!r})"

    @contextmanager
    def _transaction(self, write: bool = False) -> Iterator[sqlite3.Connection]:
        """One transaction, and the one place SQLite errors become StoreError."""
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                try:
                    yield self._conn
                except BaseException:
                    if self._conn.in_transaction:
                        self._conn.execute("ROLLBACK")
                    raise
                self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                raise StoreError(f"SQLite store {self.path!r}: {exc}") from exc

    # -- lifecycle ------------------------------------------------------------
    def migrate(self) -> None:
        with self._transaction(write=True) as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"
            )
            applied = {r["version"] for r in db.execute("SELECT version FROM schema_migrations")}
            for migration in common.load_migrations("sqlite"):
                if migration.version in applied:
                    continue
                logger.info("applying migration %04d_%s", migration.version, migration.name)
                for statement in _statements(migration.sql):
                    db.execute(statement)
                db.execute(
                    "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                    (migration.version, migration.name, time.time()),
                )

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # -- jobs -----------------------------------------------------------------
    def create_job(self, job: NewJob, now: float) -> tuple[Job, bool]:
        with self._transaction(write=True) as db:
            if job.idempotency_key is not None:
                row = db.execute(Q["job_by_key"], vars(job)).fetchone()
                if row is not None:
                    if row["request_hash"] != job.request_hash:
                        raise IdempotencyConflict(
                            f"idempotency key {job.idempotency_key!r} was used for another request"
                        )
                    return common.job_from_row(row, _loads), False
            row = db.execute(
                Q["insert_job"],
                {
                    **vars(job),
                    "id": common.new_job_id(),
                    "failover": job.failover.value,
                    "questions": _dumps(job.questions),
                    "models": _dumps(job.models),
                    "regions_by_model": _dumps(job.regions_by_model),
                    "params": _dumps(job.params),
                    "total": common.count_executions(job),
                    "now": now,
                },
            ).fetchone()
            columns = common.NEW_EXECUTION_COLUMNS
            db.executemany(
                f"INSERT INTO executions ({', '.join(columns)}) VALUES ({_marks(columns)})",
                common.execution_rows(job, row["id"], now),
            )
        logger.info("job created", extra={"job_id": row["id"], "tenant": job.tenant})
        return common.job_from_row(row, _loads), True

    def get_job(self, tenant: str, job_id: str) -> Job | None:
        with self._transaction() as db:
            row = db.execute(Q["get_job"], {"id": job_id, "tenant": tenant}).fetchone()
        return None if row is None else common.job_from_row(row, _loads)

    def job_counts(self, job_id: str) -> dict[str, dict[str, int]]:
        with self._transaction() as db:
            rows = db.execute(Q["job_counts"], {"job_id": job_id}).fetchall()
        counts: dict[str, dict[str, int]] = {}
        for row in rows:
            counts.setdefault(row["requested_region"], {})[row["state"]] = row["n"]
        return counts

    def executions(self, job_id: str, with_attempts: bool = True) -> list[Execution]:
        with self._transaction() as db:
            rows = db.execute(Q["list_executions"], {"job_id": job_id}).fetchall()
            attempts: dict[int, list[Any]] = {}
            if with_attempts:
                for a in db.execute(Q["list_attempts"], {"job_id": job_id}):
                    attempts.setdefault(a["execution_id"], []).append(
                        common.attempt_from_row(a, _loads)
                    )
        return [common.execution_from_row(r, _loads, attempts.get(r["id"], [])) for r in rows]

    def cancel_job(self, tenant: str, job_id: str, now: float) -> int:
        args = {"job_id": job_id, "tenant": tenant, "now": now}
        with self._transaction(write=True) as db:
            if not db.execute(Q["cancel_job"], args).rowcount:
                return 0
            cancelled = db.execute(Q["cancel_executions"], args).rowcount
        logger.info("job cancelled", extra={"job_id": job_id, "cancelled": cancelled})
        return cancelled

    def job_finished(self, job_id: str) -> bool:
        with self._transaction() as db:
            return db.execute(Q["job_unfinished"], {"job_id": job_id}).fetchone() is None

    # -- scheduling -----------------------------------------------------------
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
        if limit <= 0 or not region.models:
            return []
        args: dict[str, Any] = {
            "region": region.name,
            "models": _json_list(sorted(region.models)),
            "now": now,
            "expires": now + lease_s,
            "worker": worker,
            # a failover-any retry that failed here is ours again once due by then
            "handoff_due": now - max(0.0, retry_handoff_s),
        }
        with self._transaction(write=True) as db:
            leased = db.execute(Q["count_leased"], args).fetchone()["n"]
            free = min(limit, region.concurrency - leased)
            if free <= 0:
                return []
            leased_rows = []
            for execution_id, source in self._pick(db, args, free, tenant_batch):
                token = common.new_token()
                row = db.execute(
                    Q["lease"], {**args, "id": execution_id, "token": token, "source": source}
                ).fetchone()
                leased_rows.append((row, token, source))
            job_ids = _json_list(sorted({row["job_id"] for row, _, _ in leased_rows}))
            params = {
                r["id"]: _loads(r["params"])
                for r in db.execute(Q["job_params"], {"job_ids": job_ids})
            }
        return [
            common.claim_from_row(
                row,
                token=token,
                source=source,
                region=region.name,
                params=params[row["job_id"]],
                lease_expires_at=args["expires"],
            )
            for row, token, source in leased_rows
        ]

    def _pick(
        self, db: sqlite3.Connection, args: dict[str, Any], free: int, tenant_batch: int
    ) -> list[tuple[int, str]]:
        """The ids to lease, with the queue each came from, in claim order."""
        picked: list[tuple[int, str]] = [
            (r["id"], common.SOURCE_GLOBAL_RETRY)
            for r in db.execute(Q["global_retries"], {**args, "n": free})
        ]
        if len(picked) < free:
            taken = _json_list([i for i, _ in picked])
            picked += [
                (r["id"], common.SOURCE_OWN_RETRY)
                for r in db.execute(
                    Q["own_retries"], {**args, "taken": taken, "n": free - len(picked)}
                )
            ]
        if len(picked) < free:
            tenants = [r["tenant"] for r in db.execute(Q["queued_tenants"], args)]
            in_flight = {r["tenant"]: r["n"] for r in db.execute(Q["leased_by_tenant"], args)}

            def fetch(tenant: str, n: int) -> list[int]:
                query_args = {**args, "tenant": tenant, "n": n}
                return [r["id"] for r in db.execute(Q["tenant_new_work"], query_args)]

            new = common.round_robin(
                common.order_tenants(tenants, in_flight), fetch, tenant_batch, free - len(picked)
            )
            picked += [(i, common.SOURCE_NEW) for i in new]
        return picked

    def heartbeat(self, leases: Sequence[tuple[int, str]], now: float, lease_s: float) -> set[int]:
        held: set[int] = set()
        if not leases:
            return held
        with self._transaction(write=True) as db:
            for execution_id, token in leases:
                args = {"id": execution_id, "token": token, "expires": now + lease_s}
                if db.execute(Q["heartbeat"], args).rowcount:
                    held.add(execution_id)
        return held

    def complete(
        self, execution_id: int, token: str, result: dict[str, Any], now: float, started_at: float
    ) -> bool:
        args = {
            "id": execution_id,
            "token": token,
            "output": common.output_of(result),
            "result": _dumps(result),
            "now": now,
        }
        return self._finish_attempt("complete", args, started_at, error=None)

    def fail(
        self,
        execution_id: int,
        token: str,
        error: dict[str, Any],
        now: float,
        started_at: float,
        retry_at: float | None,
    ) -> bool:
        error_json = _dumps(error)
        args = {
            "id": execution_id,
            "token": token,
            "error": error_json,
            "now": now,
            "retry_at": retry_at,
        }
        return self._finish_attempt("fail", args, started_at, error=error_json)

    def _finish_attempt(
        self, query: str, args: dict[str, Any], started_at: float, error: str | None
    ) -> bool:
        """Apply a fenced complete/fail, then record the attempt it ended."""
        with self._transaction(write=True) as db:
            row = db.execute(Q[query], args).fetchone()
            if row is None:
                return False
            db.execute(
                Q["insert_attempt"],
                {
                    "id": args["id"],
                    "number": row["attempts"],
                    "region": row["executed_region"],
                    "started_at": started_at,
                    "now": args["now"],
                    "ok": error is None,
                    "error": error,
                },
            )
        return True

    def release(self, execution_id: int, token: str, now: float) -> bool:
        with self._transaction(write=True) as db:
            args = {"id": execution_id, "token": token, "now": now}
            return bool(db.execute(Q["release"], args).rowcount)

    def reap_expired(self, now: float, max_backoff_s: float = 0.0) -> int:
        args = {
            "now": now,
            "due_at": now + max_backoff_s,
            "error": _dumps(common.LEASE_EXPIRED_ERROR),
        }
        with self._transaction(write=True) as db:
            db.execute(Q["reap_attempts"], args)
            reaped = db.execute(Q["reap"], args).rowcount
        if reaped:
            logger.warning("reaped %d expired leases", reaped)
        return reaped

    def divert_queued(self, region: str, now: float) -> int:
        with self._transaction(write=True) as db:
            moved = db.execute(Q["divert_queued"], {"region": region, "now": now}).rowcount
        if moved:
            logger.info("diverted %d queued executions away from region %s", moved, region)
        return moved

    # -- regions --------------------------------------------------------------
    def set_circuit(self, region: str, state: str, open_until: float | None) -> None:
        common.check_circuit_state(state)
        with self._transaction(write=True) as db:
            args = {"region": region, "state": state, "open_until": open_until}
            db.execute(Q["set_circuit"], args)

    def queue_stats(self, now: float, regions: Sequence[RegionSpec]) -> QueueStats:
        with self._transaction() as db:
            totals = db.execute(Q["queue_totals"]).fetchone()
            rows = [
                (spec.name, db.execute(Q["queue_region"], {"region": spec.name}).fetchone())
                for spec in regions
            ]
        queues = [
            RegionQueue(
                region=name,
                queued=row["queued"],
                retry_wait=row["retry_wait"],
                in_flight=row["in_flight"],
                circuit=row["circuit"],
                circuit_open_until=row["open_until"],
            )
            for name, row in rows
        ]
        return QueueStats(global_retry=totals["global_retry"], regions=queues, dead=totals["dead"])
