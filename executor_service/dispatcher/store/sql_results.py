"""The SQL stores' result writes (complete, fail, defer), group-committed.

A finished call's write is one fenced statement (token and state checked in SQL) plus
the attempt-log row it ends; ``ResultWrites`` runs it through the store's
``GroupCommit`` (group_commit.py), so the results finishing together share one
transaction. A failure or deferral that leaves work due later also announces its due
time to the other dispatcher processes (``_announce``: PostgreSQL NOTIFY on commit).
``SQLStore`` (sql_store.py) inherits this; its hooks (``_transaction``, ``_dumps``)
and named queries (``complete``, ``fail``, ``defer``, ``lease_of``, ``insert_attempt``)
are what these methods run on.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from executor_service.dispatcher import metrics, rules
from executor_service.dispatcher.store import records
from executor_service.dispatcher.store.group_commit import GroupCommit


class _Handle(Protocol):
    def execute(self, query: str, params: Mapping[str, Any] = ..., /) -> Any: ...


DB = TypeVar("DB", bound=_Handle)
_GROUP_COMMIT_INIT = threading.Lock()


def _count_commit(writes: int) -> None:
    metrics.RESULT_COMMITS.inc()
    metrics.RESULT_WRITES.inc(writes)


class ResultWrites(ABC, Generic[DB]):
    """complete / fail / defer of a SQL store, in group commits."""

    queries: ClassVar[Mapping[str, str]]

    @abstractmethod
    def _transaction(self, write: bool = False) -> AbstractContextManager[DB]: ...

    @staticmethod
    @abstractmethod
    def _dumps(value: Any) -> Any: ...

    def _announce(self, db: DB, due_at: float) -> None:
        """Work becomes claimable at ``due_at`` (a job created, a retry scheduled, a lease
        released or reaped, queued work diverted): tell the other dispatcher processes,
        when ``db``'s transaction commits, so an idle region wakes then rather than at
        its next poll (``Store.subscribe``). By default nothing: the others poll."""

    def _result_transaction(self) -> AbstractContextManager[DB]:
        """The transaction a batch of result writes shares (``group_commit.py``). A store
        may relax its durability here where that is safe (SQLite: synchronous=NORMAL
        under WAL, see sqlite.py); by default the ordinary write transaction."""
        return self._transaction(write=True)

    @property
    def results(self) -> GroupCommit[DB]:
        """The group commit of result writes (complete, fail, defer): made at first use."""
        group: GroupCommit[DB] | None = self.__dict__.get("_group_commit")
        if group is None:
            with _GROUP_COMMIT_INIT:
                made = GroupCommit(self._result_transaction, on_commit=_count_commit)
                group = self.__dict__.setdefault("_group_commit", made)
        return group

    @staticmethod
    def _transition(to: rules.Transition) -> dict[str, Any]:
        """A rule's answer as the named parameters of fail, release and reap_one."""
        return {"state": to.state.value, "due_at": to.due_at, "finished_at": to.finished_at}

    def complete(
        self, execution_id: int, token: str, result: dict[str, Any], now: float, started_at: float
    ) -> bool:
        args = {
            "id": execution_id,
            "token": token,
            "output": records.output_of(result),
            "result": self._dumps(result),
            "now": now,
        }
        # Group commit: written in one transaction with the other results finishing now.
        return self.results.run(
            lambda db: self._finish_attempt(db, "complete", args, started_at, error=None)
        )

    def _finish_attempt(
        self, db: DB, query: str, args: dict[str, Any], started_at: float, error: Any
    ) -> bool:
        """Apply a fenced complete/fail/defer (the named ``query``, which returns the
        call's number, attempts + deferrals, and executed_region), then record the
        attempt it ended. ``error`` is
        the failure as a JSON parameter, None for a success."""
        row = db.execute(self.queries[query], args).fetchone()
        if row is None:
            return False
        attempt = {
            "id": args["id"],
            "number": row["call_number"],
            "region": row["executed_region"],
            "started_at": started_at,
            "now": args["now"],
            "ok": error is None,
            "error": error,
        }
        db.execute(self.queries["insert_attempt"], attempt)
        return True

    def fail(
        self,
        execution_id: int,
        token: str,
        error: dict[str, Any],
        now: float,
        started_at: float,
        retry_at: float | None,
    ) -> bool:
        return self._failed("fail", execution_id, token, error, now, started_at, retry_at)

    def defer(
        self,
        execution_id: int,
        token: str,
        error: dict[str, Any],
        now: float,
        started_at: float,
        retry_at: float | None,
    ) -> bool:
        return self._failed("defer", execution_id, token, error, now, started_at, retry_at)

    def _failed(
        self,
        query: str,
        execution_id: int,
        token: str,
        error: dict[str, Any],
        now: float,
        started_at: float,
        retry_at: float | None,
    ) -> bool:
        """fail and defer: the named ``query`` (fenced) and the attempt it ended, in a
        group commit with the other results finishing now (as complete)."""
        lease = {"id": execution_id, "token": token}

        def write(db: DB) -> bool:
            row = db.execute(self.queries["lease_of"], lease).fetchone()
            if row is None:
                return False
            to = rules.after_failure(retry_at, bool(row["cancelled"]), now)
            args = {**lease, **self._transition(to), "error": self._dumps(error), "now": now}
            written = self._finish_attempt(db, query, args, started_at, error=self._dumps(error))
            if written and to.due_at is not None:
                self._announce(db, to.due_at)  # a retry (or a deferred call) falls due then
            return written

        return self.results.run(write)
