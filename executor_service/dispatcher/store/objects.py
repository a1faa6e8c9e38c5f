"""Stored objects of the OpenAI Batch API (uploaded files and batches) and the answers kept
for reuse (``reuse.py``): one table (``openai_objects``, migration 0004) beside the jobs.

Kept out of the :class:`~.base.Store` interface on purpose for now: a batch's requests
are ordinary jobs of the store, and what is left is four key-value operations on a
table of its own. :func:`objects_for` gives the implementation that matches a store:
the same database (and transactions) for the SQL stores, dicts for the memory store.
"""

from __future__ import annotations

import re
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import Any

from .base import Store


@dataclass(frozen=True)
class StoredObject:
    kind: str  # "file" | "batch" | "call" (reuse.py)
    id: str
    tenant: str
    created_at: float
    body: dict[str, Any]
    content: bytes | None = None


class ObjectStore(ABC):
    @abstractmethod
    def put(self, obj: StoredObject) -> None:
        """Insert the object, unless one of its kind and id exists (then the first stays)."""

    @abstractmethod
    def get(
        self, tenant: str, kind: str, object_id: str, content: bool = False
    ) -> StoredObject | None:
        """The tenant's object (another tenant's is None); its content only if asked."""

    @abstractmethod
    def update_body(self, tenant: str, kind: str, object_id: str, body: dict[str, Any]) -> None:
        """Replace the object's body."""

    @abstractmethod
    def list(self, tenant: str, kind: str) -> list[StoredObject]:
        """The tenant's objects of a kind, newest first, without content."""


@dataclass
class MemoryObjects(ObjectStore):
    objects: dict[tuple[str, str], StoredObject] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def put(self, obj: StoredObject) -> None:
        with self._lock:
            self.objects.setdefault((obj.kind, obj.id), obj)

    def get(
        self, tenant: str, kind: str, object_id: str, content: bool = False
    ) -> StoredObject | None:
        obj = self.objects.get((kind, object_id))
        if obj is None or obj.tenant != tenant:
            return None
        return obj if content else replace(obj, content=None)

    def update_body(self, tenant: str, kind: str, object_id: str, body: dict[str, Any]) -> None:
        with self._lock:
            obj = self.objects.get((kind, object_id))
            if obj is not None and obj.tenant == tenant:
                self.objects[(kind, object_id)] = replace(obj, body=body)

    def list(self, tenant: str, kind: str) -> list[StoredObject]:
        found = [
            replace(o, content=None)
            for o in self.objects.values()
            if o.kind == kind and o.tenant == tenant
        ]
        return sorted(found, key=lambda o: (o.created_at, o.id), reverse=True)


QUERIES = {
    "put": "INSERT INTO openai_objects (kind, id, tenant, created_at, body, content) "
    "VALUES (:kind, :id, :tenant, :created_at, :body, :content) "
    "ON CONFLICT (kind, id) DO NOTHING",
    "get": "SELECT kind, id, tenant, created_at, body{content} FROM openai_objects "
    "WHERE kind = :kind AND id = :id AND tenant = :tenant",
    "update_body": "UPDATE openai_objects SET body = :body "
    "WHERE kind = :kind AND id = :id AND tenant = :tenant",
    "list": "SELECT kind, id, tenant, created_at, body FROM openai_objects "
    "WHERE tenant = :tenant AND kind = :kind ORDER BY created_at DESC, id DESC",
}


class SQLObjects(ObjectStore):
    """On the SQL store's own connection and transactions (its JSON hooks too)."""

    def __init__(self, store: Any, named: bool) -> None:
        self.store = store
        # SQLite takes :name parameters, psycopg %(name)s
        self.queries = (
            dict(QUERIES)
            if named
            else {k: re.sub(r":(\w+)", r"%(\1)s", q) for k, q in QUERIES.items()}
        )

    def _row(self, row: Any) -> StoredObject:
        content = row.get("content")
        return StoredObject(
            kind=row["kind"],
            id=row["id"],
            tenant=row["tenant"],
            created_at=float(row["created_at"]),
            body=self.store._loads(row["body"]),
            content=None if content is None else bytes(content),
        )

    def put(self, obj: StoredObject) -> None:
        args = {
            "kind": obj.kind,
            "id": obj.id,
            "tenant": obj.tenant,
            "created_at": obj.created_at,
            "body": self.store._dumps(obj.body),
            "content": obj.content,
        }
        with self.store._transaction(write=True) as db:
            db.execute(self.queries["put"], args)

    def get(
        self, tenant: str, kind: str, object_id: str, content: bool = False
    ) -> StoredObject | None:
        query = self.queries["get"].format(content=", content" if content else "")
        with self.store._transaction() as db:
            row = db.execute(query, {"kind": kind, "id": object_id, "tenant": tenant}).fetchone()
        return None if row is None else self._row(row)

    def update_body(self, tenant: str, kind: str, object_id: str, body: dict[str, Any]) -> None:
        args = {"kind": kind, "id": object_id, "tenant": tenant, "body": self.store._dumps(body)}
        with self.store._transaction(write=True) as db:
            db.execute(self.queries["update_body"], args)

    def list(self, tenant: str, kind: str) -> list[StoredObject]:
        with self.store._transaction() as db:
            rows = db.execute(self.queries["list"], {"tenant": tenant, "kind": kind}).fetchall()
        return [self._row(r) for r in rows]


def objects_for(store: Store) -> ObjectStore:
    """The object store that lives beside ``store`` (created once per store)."""
    existing = getattr(store, "_openai_objects", None)
    if existing is not None:
        return existing
    from .memory import MemoryStore

    objects: ObjectStore
    if isinstance(store, MemoryStore):
        objects = MemoryObjects()
    else:
        from .sqlite import SQLiteStore

        objects = SQLObjects(store, named=isinstance(store, SQLiteStore))
    store._openai_objects = objects  # type: ignore[attr-defined]
    return objects
