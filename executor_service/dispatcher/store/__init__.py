"""The dispatcher's durable store, opened from a database URL.

``sqlite:///relative/path.db``, ``sqlite:////absolute/path.db`` and
``sqlite:///:memory:`` open the embedded SQLite store (one dispatcher host);
``postgresql://...`` and ``postgres://...`` open the PostgreSQL store (any number
of dispatcher processes); ``memory://`` the in-memory store (one process, nothing
kept: tests and trials).

    base.py        the interface (Store) and its errors
    models.py      the records: jobs, executions, attempts, claims, queue stats
    records.py     ids, tokens, job expansion, rows -> records (shared by every store)
    memory.py      MemoryStore: dicts, inspectable state
    sql_store.py   what the SQL stores share (most operations)
    sql_results.py their result writes (group_commit.py); pg_notify.py  wake-ups
    sqlite.py      SQLiteStore;  postgres.py  PostgresStore
    sql_files.py   loading migrations (sql/<dialect>/) and named queries (sql/queries_*.sql)

The scheduling rules the stores apply live in ``dispatcher/rules.py``.
"""

from __future__ import annotations

import logging

from executor_service.dispatcher.store.base import Store, StoreError

logger = logging.getLogger(__name__)

__all__ = ["DatabaseURLError", "Store", "StoreError", "open_store"]


class DatabaseURLError(StoreError, ValueError):
    """The database URL names no store this service can open."""


def sqlite_path(database_url: str) -> str:
    """The file path in a ``sqlite:///...`` URL (``:memory:`` kept as is)."""
    rest = database_url.removeprefix("sqlite://")
    if not rest.startswith("/") or rest == "/":
        raise DatabaseURLError(
            "a SQLite URL is sqlite:///relative/path.db, sqlite:////absolute/path.db"
            " or sqlite:///:memory:"
        )
    return rest[1:]


def open_store(database_url: str, *, migrate: bool = True) -> Store:
    """Open the store the URL names and, unless told not to, apply pending migrations.

    Raises DatabaseURLError for a scheme we do not support (the message names the
    scheme only, never the URL, which may hold a password)."""
    scheme = database_url.partition("://")[0].lower() if "://" in database_url else ""
    store: Store
    if scheme == "memory":
        from executor_service.dispatcher.store.memory import MemoryStore

        store = MemoryStore()
    elif scheme == "sqlite":
        from executor_service.dispatcher.store.sqlite import SQLiteStore

        store = SQLiteStore(sqlite_path(database_url))
    elif scheme in {"postgresql", "postgres"}:
        from executor_service.dispatcher.store.postgres import PostgresStore

        store = PostgresStore(database_url)
    else:
        raise DatabaseURLError(
            f"unsupported database URL scheme {scheme or '(none)'!r}: expected"
            " sqlite:///path.db, postgresql://..., postgres://... or memory://"
        )
    if migrate:
        try:
            store.migrate()
        except BaseException:
            store.close()
            raise
    return store
