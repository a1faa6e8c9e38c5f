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
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from executor_service.dispatcher.rules import ClaimRequest
from executor_service.dispatcher.store import records
from executor_service.dispatcher.store.base import NewJob, StoreError
from executor_service.dispatcher.store.models import Claims
from executor_service.dispatcher.store.sql_files import load_migrations, load_queries
from executor_service.dispatcher.store.sql_store import SQLStore

logger = logging.getLogger(__name__)

Q = load_queries("sqlite")


def _dict_row(cursor: sqlite3.Cursor, row: tuple[Any, ...]) -> dict[str, Any]:
    return {col[0]: value for col, value in zip(cursor.description, row, strict=True)}


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


class SQLiteStore(SQLStore[sqlite3.Connection]):
    """The Store on one SQLite file (or ``:memory:`` for tests). The operations
    that are the same SQL on PostgreSQL come from SQLStore."""

    queries = Q

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
            self._wal = False
            if not in_memory:
                mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()
                self._wal = str(next(iter(mode.values()))).lower() == "wal"
            # FULL: a job acknowledged to a client survives a power cut, not just a crash.
            # Claims and result batches alone commit NORMAL (``_result_transaction``: why
            # it is safe).
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
            self._conn.execute("PRAGMA foreign_keys=ON")
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open the SQLite store {path!r}: {exc}") from exc

    def __repr__(self) -> str:
        return f"SQLiteStore({self.path!r})"

    @staticmethod
    def _loads(value: Any) -> Any:
        """JSON columns are TEXT: parse them."""
        return None if value is None else json.loads(value)

    @staticmethod
    def _list(values: Sequence[Any]) -> str:
        return _json_list(values)

    @staticmethod
    def _dumps(value: Any) -> str | None:
        """JSON parameters are compact TEXT."""
        return None if value is None else json.dumps(value, separators=(",", ":"))

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

    @contextmanager
    def _result_transaction(self) -> Iterator[sqlite3.Connection]:
        """A batch of result writes (group commit), or a claim, committed with
        synchronous=NORMAL under WAL; every other transaction stays FULL.

        Why that is safe. Under WAL, a NORMAL commit appends the transaction's frames
        to the WAL file with write(2) but does not fsync it. A *process* crash (kill
        -9, OOM, a segfault) loses nothing: the bytes are in the kernel's page
        cache, and the next open replays the WAL. Only a power cut or a kernel crash
        can lose them, and then only the commits since the WAL's last fsync, which
        the next FULL commit of any connection (a heartbeat, every lease_s / 3 while
        calls run; a job created; a release, a reap) or a checkpoint makes.
        SQLite's WAL recovery keeps a prefix of the commit history (checksummed
        frames, replayed in order), so the file is never corrupt and what survives
        is a consistent earlier state. In that state a lost result's execution is
        still leased, with the lease it had: the lease expires, the reaper returns
        it to the queue, and the call runs again - what happens anyway when a
        dispatcher crashes between a call and its write (at-least-once calls, one
        recorded result). A lost claim's execution is back where the claim found it
        (queued, or a due retry), with its attempt not counted: it is claimed and
        called again, and the lost lease's token writes nothing (fenced). Seats: a
        power cut stops every process on the host, so no call holds a seat the
        store forgot. A job, once acknowledged to its client, is never lost:
        create_job commits FULL. The one thing a user may see after a power cut is
        a result seen just before it computed again. ``:memory:`` databases have no
        WAL and nothing to sync: unchanged."""
        with self._lock:
            relax = self._wal
            try:
                if relax:
                    self._conn.execute("PRAGMA synchronous=NORMAL")
                try:
                    with self._transaction(write=True) as db:
                        yield db
                finally:
                    if relax:
                        self._conn.execute("PRAGMA synchronous=FULL")
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
            for migration in load_migrations("sqlite"):
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
    def _insert_job(
        self, db: sqlite3.Connection, job: NewJob, args: dict[str, Any]
    ) -> tuple[records.Row, bool]:
        """Look the idempotency key up first: under BEGIN IMMEDIATE nobody can insert
        it between the look-up and the insert."""
        if job.idempotency_key is not None:
            row = db.execute(Q["job_by_key"], args).fetchone()
            if row is not None:
                return row, False
        return db.execute(Q["insert_job"], args).fetchone(), True

    def _insert_executions(self, db: sqlite3.Connection, rows: Iterable[tuple[Any, ...]]) -> None:
        columns = records.NEW_EXECUTION_COLUMNS
        db.executemany(
            f"INSERT INTO executions ({', '.join(columns)}) VALUES ({_marks(columns)})", rows
        )

    # -- scheduling -----------------------------------------------------------
    def claim(self, request: ClaimRequest) -> Claims:
        """One transaction under the write lock, committed at synchronous=NORMAL (see
        ``_result_transaction``): the claim's reads (``_claim_reads``), the pick
        (``_paced_pick``), then every lease in one UPDATE ... RETURNING."""
        if request.empty:
            return Claims()
        args = self._claim_args(request)
        with self._result_transaction() as db:  # synchronous=NORMAL, as results
            state = self._claim_reads(db, args, request)
            free = min(request.limit, request.region.concurrency - state.total_leased)
            if free <= 0:
                return Claims()
            picked, held, changed = self._paced_pick(db, args, request, free, state)
            for pace in changed:
                db.execute(Q["pace_put"], records.pace_args(pace, self._dumps))
            tokens = [records.new_token() for _ in picked]
            rows: list[records.Row] = []
            if picked:
                leases = [[i, t, s.value] for (i, s, _), t in zip(picked, tokens, strict=True)]
                rows = db.execute(Q["lease"], {**args, "leases": _json_list(leases)}).fetchall()
        return self._claims(request, picked, tokens, rows, held)

    def _own_retries(
        self, db: sqlite3.Connection, args: dict[str, Any], taken: list[int], n: int
    ) -> list[int]:
        query_args = {**args, "taken": _json_list(taken), "n": n}
        return [r["id"] for r in db.execute(Q["own_retries"], query_args)]

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

    def _expired_leases(self, db: sqlite3.Connection, now: float) -> list[records.Row]:
        """Under BEGIN IMMEDIATE nothing else writes: a plain read is the lock."""
        return db.execute(Q["expired_leases"], {"now": now}).fetchall()

    # -- regions --------------------------------------------------------------
    def _queue_regions(self, db: sqlite3.Connection, names: list[str]) -> list[records.Row]:
        return [db.execute(Q["queue_region"], {"region": name}).fetchone() for name in names]
