"""Helpers to give each test a fresh dispatcher store: SQLite in a temporary folder,
or PostgreSQL in its own database cloned from a template that has the migrations
applied (made once per session, as procrastinate does), dropped afterwards.

Plain functions and a class rather than fixtures, so any test module can build
its own ``store`` fixture from them without fixture-import tricks.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from executor_service.dispatcher.store import open_store

# The server the integration tests use; databases are created in it and dropped.
POSTGRES_URL = os.environ.get("ES_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


def database_url(base_url: str, name: str) -> str:
    """``base_url`` pointing at database ``name`` instead."""
    return urlsplit(base_url)._replace(path="/" + name).geturl()


def sqlite_url(folder: Path) -> str:
    """The URL of a SQLite store file in ``folder`` (created and migrated when opened)."""
    return f"sqlite:///{folder / 'dispatcher.db'}"


class PostgresDatabases:
    """Creates a migrated template database once, then one database per test from it."""

    def __init__(self, admin_url: str = POSTGRES_URL) -> None:
        self.admin_url = admin_url
        self.template = f"es_tpl_{uuid.uuid4().hex[:12]}"
        self._admin("CREATE DATABASE {}", self.template)
        store = open_store(database_url(admin_url, self.template))  # applies the migrations
        store.close()

    def _admin(self, statement: str, *names: str) -> None:
        """Run a statement on the admin database; ``names`` fill its {} as identifiers."""
        import psycopg  # here: the SQLite tests must not need the PostgreSQL driver
        from psycopg import sql

        query: Any = sql.SQL(statement).format(*(sql.Identifier(n) for n in names))
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(query)

    def create(self) -> str:
        """A new database cloned from the template; returns its URL."""
        name = f"es_test_{uuid.uuid4().hex[:12]}"
        self._admin("CREATE DATABASE {} TEMPLATE {}", name, self.template)
        return database_url(self.admin_url, name)

    def drop(self, url: str) -> None:
        """Drop a database made by create() (FORCE: a failed test may leave sessions)."""
        name = urlsplit(url).path.lstrip("/")
        self._admin("DROP DATABASE IF EXISTS {} WITH (FORCE)", name)

    def close(self) -> None:
        """Drop the template."""
        self.drop(database_url(self.admin_url, self.template))
