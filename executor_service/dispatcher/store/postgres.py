"""The PostgreSQL store: any number of dispatcher processes on any number of hosts.

Connections come from a psycopg_pool.ConnectionPool, opened explicitly and
shared by the threads of the process. Each operation is one transaction at
READ COMMITTED.

Concurrency, the part that matters:

- claim() first takes a transaction-level advisory lock on the region, then
  counts the region's leases, then picks rows with ``FOR UPDATE SKIP LOCKED``.
  The lock makes "count, then lease" atomic across processes, so a region is
  never given more than its slots; the count runs in a statement after the
  lock, so it sees every lease committed by the previous holder (the bug
  pgqueuer fixed in 1.4.0 was counting before locking). SKIP LOCKED keeps two
  regions claiming the same global retry from waiting on each other.
- Writes that can race with cancel_job (fail, release, reap: ``lease_of`` and
  ``_expired_leases``) lock the job row FOR SHARE before the execution row, and
  cancel_job updates the job row before its executions: the same lock order
  everywhere, no deadlock, and a failure racing a cancel cannot leave a retry
  behind for a cancelled job.
- divert_queued (a region's circuit opened) locks the rows it moves with
  ``FOR UPDATE SKIP LOCKED``: it never waits for a claimer or a cancel holding
  some of them, so it cannot deadlock with either; what it skips, the next
  divert (one cool-down later) moves.
- complete/fail/heartbeat/release match on id, lease token and state leased;
  PostgreSQL re-checks that condition after waiting for a concurrent writer,
  so a stale token never writes.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any

import psycopg
from psycopg.rows import DictRow, dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool
from psycopg_pool.base import AttemptWithBackoff

from executor_service.dispatcher.rules import ClaimRequest
from executor_service.dispatcher.store import records
from executor_service.dispatcher.store.base import NewJob, StoreError
from executor_service.dispatcher.store.models import Claims
from executor_service.dispatcher.store.pg_notify import NOTIFY_SQL, DueListener, payload
from executor_service.dispatcher.store.sql_files import load_migrations, load_queries
from executor_service.dispatcher.store.sql_store import ClaimState, SQLStore

logger = logging.getLogger(__name__)

# First key of our two-key advisory locks ("ESDC"), so they cannot collide with
# another application's locks on the same database.
_LOCK_NAMESPACE = 0x45534443
_MIGRATION_LOCK = 0  # second key of the migration lock; regions use hashtext(name)

Cursor = psycopg.Cursor[DictRow]
Q = load_queries("postgres")
#: connect timeout of the claim loops' and the listener's own connections, seconds
LOOP_CONNECT_TIMEOUT_S = 2

# Store outages (the database refuses connections, restarts, fails over). Measured before:
# store-bound requests waited psycopg_pool's default 30 s for a connection, and progress
# resumed ~18 s after the database was back (the pool's reconnect backoff doubles).
#: how long an operation waits for a pooled connection before it is a StoreError (503)
CONNECTION_WAIT_S = 1.0
#: a new connection that takes longer than this to open has failed
CONNECT_TIMEOUT_S = 2
#: while the database is away the pool tries to reconnect this often (no doubling)
RECONNECT_EVERY_S = 0.5


class _SteadyReconnect(AttemptWithBackoff):
    """Reconnect attempts at a steady pace, so the pool is whole again within
    RECONNECT_EVERY_S of the database's return, however long it was away."""

    INITIAL_DELAY = RECONNECT_EVERY_S
    DELAY_BACKOFF = 1.0


class _Pool(ConnectionPool[Any]):
    def _add_connection(self, attempt: AttemptWithBackoff | None, growing: bool = False) -> None:
        # psycopg_pool starts each reconnection with an AttemptWithBackoff of its own;
        # this is the one place it does, so the steady pace is set here.
        super()._add_connection(
            attempt or _SteadyReconnect(timeout=self.reconnect_timeout), growing
        )


class PostgresStore(SQLStore[Cursor]):
    """The Store on PostgreSQL (``postgresql://`` or ``postgres://`` conninfo). The
    operations that are the same SQL on SQLite come from SQLStore."""

    queries = Q

    def __init__(
        self, conninfo: str, *, min_size: int = 1, max_size: int = 10, open_timeout_s: float = 30.0
    ) -> None:
        try:
            # One direct connection first: a wrong URL fails at once with the server's
            # reason, where the pool would keep retrying until its timeout.
            psycopg.connect(conninfo, connect_timeout=max(1, int(open_timeout_s))).close()
        except psycopg.Error as exc:
            raise StoreError(f"cannot connect to the PostgreSQL store: {exc}") from exc
        self._conninfo = conninfo
        # The claim and listen connections are (re)opened while the loops run: a short
        # timeout, so an unreachable server costs a claim loop seconds, not open_timeout_s.
        self._connect_timeout = min(max(1, int(open_timeout_s)), LOOP_CONNECT_TIMEOUT_S)
        # claim loops' own connections (one per claiming thread), see _claim_transaction
        self._claim_local = threading.local()
        self._claim_conns: list[psycopg.Connection[DictRow]] = []
        self._claim_conns_lock = threading.Lock()
        self._listeners: list[DueListener] = []
        self._pool: ConnectionPool[Any] = _Pool(
            conninfo,
            min_size=min_size,
            max_size=max_size,
            open=False,
            name="executor-service-store",
            kwargs={
                "autocommit": False,
                "row_factory": dict_row,
                "connect_timeout": CONNECT_TIMEOUT_S,
            },
            # A connection the database dropped (restart, failover) is found at checkout
            # and replaced, instead of failing the operation that drew it.
            check=ConnectionPool.check_connection,
            timeout=CONNECTION_WAIT_S,
        )
        try:
            self._pool.open(wait=True, timeout=open_timeout_s)
        except psycopg.Error as exc:
            self._pool.close()
            raise StoreError(f"cannot connect to the PostgreSQL store: {exc}") from exc

    def __repr__(self) -> str:
        return f"PostgresStore(pool={self._pool.name!r})"

    @staticmethod
    def _loads(value: Any) -> Any:
        """jsonb columns arrive as Python objects already."""
        return value

    @staticmethod
    def _list(values: Sequence[Any]) -> list[Any]:
        return list(values)

    @staticmethod
    def _dumps(value: Any) -> Jsonb:
        """JSON parameters are passed as jsonb."""
        return Jsonb(value)

    @contextmanager
    def _transaction(self, write: bool = False) -> Iterator[Cursor]:
        """One transaction (committed on success, rolled back on error), and the one
        place psycopg errors become StoreError. ``write`` is ignored: writers take
        row locks (and claim its region lock) as they go."""
        try:
            with self._pool.connection(timeout=CONNECTION_WAIT_S) as conn, conn.cursor() as cur:
                yield cur
        except psycopg.Error as exc:
            raise StoreError(f"PostgreSQL store: {exc}") from exc

    @contextmanager
    def _claim_transaction(self) -> Iterator[Cursor]:
        """A claim's transaction on the claiming thread's own connection, kept open
        between claims: a region's claim loop never waits for a pooled connection
        behind the call threads' result writes and the heartbeat, and skips the pool's
        check-out and reset on every claim. The connection is dropped on any error
        (the next claim opens a fresh one), and closed with the store."""
        conn: psycopg.Connection[DictRow] | None = getattr(self._claim_local, "conn", None)
        try:
            if conn is None or conn.closed:
                conn = psycopg.connect(
                    self._conninfo,
                    autocommit=False,
                    row_factory=dict_row,
                    connect_timeout=self._connect_timeout,
                )
                conn.execute(Q["claim_reads_function"])  # this session's, see claim_reads
                conn.commit()
                self._claim_local.conn = conn
                with self._claim_conns_lock:
                    self._claim_conns.append(conn)
            try:
                with conn.cursor() as cur:
                    yield cur
                conn.commit()
            except BaseException:
                self._drop_claim_conn(conn)
                raise
        except psycopg.Error as exc:
            raise StoreError(f"PostgreSQL store: {exc}") from exc

    def _drop_claim_conn(self, conn: psycopg.Connection[DictRow]) -> None:
        with suppress(psycopg.Error):
            conn.close()  # an open transaction is rolled back by the server
        self._claim_local.conn = None
        with self._claim_conns_lock:
            if conn in self._claim_conns:
                self._claim_conns.remove(conn)

    # -- wake-ups across processes (pg_notify.py) --------------------------------
    def _announce(self, cur: Cursor, due_at: float) -> None:
        """NOTIFY the other dispatcher processes on commit: work is due at ``due_at``."""
        cur.execute(NOTIFY_SQL, {"due_at": payload(due_at)})

    def subscribe(self, on_due: Callable[[float], None]) -> DueListener:
        """LISTEN on a connection of its own, in a thread, until the listener is closed."""
        listener = DueListener(self._conninfo, on_due, self._connect_timeout)
        with self._claim_conns_lock:
            self._listeners.append(listener)
        return listener

    # -- lifecycle ------------------------------------------------------------
    def migrate(self) -> None:
        with self._transaction() as cur:
            # Serialise concurrent starts: only one process applies a migration.
            cur.execute(f"SELECT pg_advisory_xact_lock({_LOCK_NAMESPACE}, {_MIGRATION_LOCK})")
            cur.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            applied = {r["version"] for r in cur.execute("SELECT version FROM schema_migrations")}
            for migration in load_migrations("postgres"):
                if migration.version in applied:
                    continue
                logger.info("applying migration %04d_%s", migration.version, migration.name)
                cur.execute(migration.sql)  # the SQL of our own migration files
                cur.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                    (migration.version, migration.name),
                )

    def close(self) -> None:
        with self._claim_conns_lock:
            conns, self._claim_conns = self._claim_conns, []
            listeners, self._listeners = self._listeners, []
        for listener in listeners:
            listener.close()
        for conn in conns:
            with suppress(psycopg.Error):
                conn.close()
        self._pool.close()

    # -- jobs -----------------------------------------------------------------
    def _insert_job(
        self, cur: Cursor, job: NewJob, args: dict[str, Any]
    ) -> tuple[records.Row, bool]:
        """Insert first: ON CONFLICT waits for a concurrent insert of the same key to
        commit or abort, then the key's job is looked up."""
        row = cur.execute(Q["insert_job"], args).fetchone()
        if row is not None:
            return row, True
        existing = cur.execute(Q["job_by_key"], args).fetchone()
        if existing is None:  # pragma: no cover - the conflicting job vanished
            raise StoreError("idempotency conflict on a job that no longer exists")
        return existing, False

    def _insert_executions(self, cur: Cursor, rows: Iterable[tuple[Any, ...]]) -> None:
        columns = ", ".join(records.NEW_EXECUTION_COLUMNS)
        # COPY: 100,000 executions in about a second instead of minutes of INSERTs.
        with cur.copy(f"COPY executions ({columns}) FROM STDIN") as copy:
            for values in rows:
                copy.write_row(values)

    # -- scheduling -----------------------------------------------------------
    def claim(self, request: ClaimRequest) -> Claims:
        """Four round trips on the claim loop's own connection when no retry is due and
        one tenant has queued work: the region's advisory lock with the claim's reads
        (``_claim_reads``); the candidate query of ``rules.pick``; the lease, with its
        jobs' params; the commit. (psycopg's pipeline mode was tried for the first and
        for the last two: more waits per claim on loopback, not fewer.)"""
        if request.empty:
            return Claims()
        args = {**self._claim_args(request), "namespace": _LOCK_NAMESPACE}
        with self._claim_transaction() as cur:
            state = self._claim_reads(cur, args, request)
            free = min(request.limit, request.region.concurrency - state.total_leased)
            if free <= 0:
                return Claims()
            picked, held, changed = self._paced_pick(cur, args, request, free, state)
            tokens = [records.new_token() for _ in picked]
            lease = {
                **args,
                "ids": [i for i, _, _ in picked],
                "tokens": tokens,
                "sources": [s.value for _, s, _ in picked],
            }
            for pace in changed:  # only when a budget or a limit moved
                cur.execute(Q["pace_put"], records.pace_args(pace, self._dumps))
            rows = cur.execute(Q["lease"], lease).fetchall() if picked else []
        return self._claims(request, picked, tokens, rows, held)

    def _claim_reads(self, cur: Cursor, args: dict[str, Any], request: ClaimRequest) -> ClaimState:
        """The region's advisory lock and the claim's reads in one round trip: the
        claim connection's temporary function ``es_claim_reads`` (claim_reads_function)
        takes the lock, then runs each read with a snapshot of its own, after the lock.
        A temporary function lives in its session: like LISTEN, the claim connection
        must be a server session of its own (no transaction-mode pooler in between)."""
        reads = cur.execute(Q["claim_reads"], args).fetchone()["reads"]  # type: ignore[index]
        return ClaimState(
            dict(reads["leased"]),
            self._paces_of_claim(cur, request, reads["paces"]),
            bool(reads["due"]),
            list(reads["tenants"]),
            dict(reads["leased_by_tenant"]),
        )

    def _lock_region(self, cur: Cursor, region: str) -> None:
        """A hedge takes its seat under the region's claim lock (sql_hedges.py)."""
        cur.execute(Q["lock_region"], {"namespace": _LOCK_NAMESPACE, "region": region})

    def _own_retries(
        self, cur: Cursor, args: dict[str, Any], taken: list[int], n: int
    ) -> list[int]:
        """Read the candidates unlocked, then lock them one by one by primary key."""
        own = {**args, "taken": taken, "n": n}
        own["candidates"] = [r["id"] for r in cur.execute(Q["own_retry_candidates"], own)]
        if not own["candidates"]:
            return []
        return [r["id"] for r in cur.execute(Q["lock_candidates"], own)]

    def heartbeat(self, leases: Sequence[tuple[int, str]], now: float, lease_s: float) -> set[int]:
        if not leases:
            return set()
        args = {
            "expires": now + lease_s,
            "ids": [i for i, _ in leases],
            "tokens": [t for _, t in leases],
        }
        with self._transaction() as cur:
            return {r["id"] for r in cur.execute(Q["heartbeat"], args)}

    def _expired_leases(self, cur: Cursor, now: float) -> list[records.Row]:
        """Jobs first (FOR SHARE, in id order: cancel_job's lock order), then the expired
        executions FOR UPDATE SKIP LOCKED: one a finishing worker holds is left to it."""
        args: dict[str, Any] = {"now": now}
        args["job_ids"] = sorted(r["job_id"] for r in cur.execute(Q["expired_jobs"], args))
        if not args["job_ids"]:
            return []
        cancelled = {r["id"] for r in cur.execute(Q["lock_jobs"], args) if r["cancelled"]}
        return [
            {**r, "cancelled": r["job_id"] in cancelled}
            for r in cur.execute(Q["expired_leases"], args)
        ]

    # -- regions --------------------------------------------------------------
    def _queue_regions(self, cur: Cursor, names: list[str]) -> list[records.Row]:
        rows = {r["name"]: r for r in cur.execute(Q["queue_regions"], {"regions": names})}
        return [rows[name] for name in names]
