"""Group commit: the result writes of many call threads share one transaction.

Every finished call writes its result (``complete``/``fail``, fenced by its lease
token) in a transaction of its own: with 16 slots and an instant executor that is
hundreds of commits per second, each one a WAL fsync (SQLite, synchronous=FULL)
or a round trip and a WAL flush (PostgreSQL), and a slot waits for its commit
before it is free again. ``GroupCommit.run(op)`` instead queues ``op`` (a function
of the transaction's handle, returning the op's answer); the first thread to find
no batch running becomes the leader, takes every op queued so far and runs them
all in one transaction; the others wait for it. While that transaction runs, the
next results queue up and form the next batch: one transaction for the results
that finished during the previous commit (a few ms), with no timer, so a lone
result is written at once and adds no latency.

Guarantees are the single write's:

- each op is the same fenced statement it was alone (token and state checked in
  SQL), so a stale token still writes nothing; its answer (True/False) is its own;
- an op's answer is returned only after the transaction holding it committed, so
  a caller that saw True knows its result is stored, as before;
- if the batch's transaction fails (one op's error aborts a PostgreSQL
  transaction, a deadlock victim, a lost connection), nothing of it is kept and
  every op of it is run again alone in a transaction of its own: one bad op never
  fails another, and each caller gets its own answer or its own exception.

Writes never wait for each other's locks inside a batch in a way that could
deadlock: every op locks only its own execution row (and, on PostgreSQL, its job
row FOR SHARE, which other shares never block); PostgreSQL would abort a
deadlock anyway, and the batch would then be replayed op by op.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Generic, TypeVar

DB = TypeVar("DB")
T = TypeVar("T")

# A batch never holds more than this many writes (bounds one transaction's length).
MAX_BATCH = 128


class _Pending(Generic[DB]):
    __slots__ = ("done", "error", "op", "value")

    def __init__(self, op: Callable[[DB], Any]) -> None:
        self.op = op
        self.done = False
        self.value: Any = None
        self.error: BaseException | None = None


class GroupCommit(Generic[DB]):
    """Runs ops from many threads in shared transactions from ``transaction()``."""

    def __init__(
        self,
        transaction: Callable[[], AbstractContextManager[DB]],
        max_batch: int = MAX_BATCH,
        on_commit: Callable[[int], None] = lambda _n: None,
    ) -> None:
        """``on_commit(n)`` is told of every transaction run and how many writes it held
        (the dispatcher's metrics)."""
        self._transaction = transaction
        self._max_batch = max_batch
        self._on_commit = on_commit
        self._cond = threading.Condition()
        self._queue: list[_Pending[DB]] = []
        self._leading = False
        # counters, for tests and metrics: transactions committed, ops written in them
        self.batches = 0
        self.ops = 0

    def run(self, op: Callable[[DB], T]) -> T:
        """Run ``op(handle)`` in a transaction shared with the ops queued alongside;
        return its value once that transaction committed (or raise its own error)."""
        mine: _Pending[DB] = _Pending(op)
        with self._cond:
            self._queue.append(mine)
            while not mine.done and self._leading:
                self._cond.wait()
            if not mine.done:
                # Lead: nobody is writing; take the oldest queued writes, ours among them.
                self._leading = True
                batch = self._queue[: self._max_batch]
                if mine not in batch:  # more waiting than a batch holds: ours goes too
                    batch = [*self._queue[: self._max_batch - 1], mine]
                for pending in batch:
                    self._queue.remove(pending)
        if not mine.done:
            try:
                self._write(batch)
            finally:
                with self._cond:
                    self._leading = False
                    for pending in batch:
                        pending.done = True
                    self._cond.notify_all()
        if mine.error is not None:
            raise mine.error
        return mine.value

    def _write(self, batch: list[_Pending[DB]]) -> None:
        try:
            with self._transaction() as db:
                values = [pending.op(db) for pending in batch]
        except BaseException as exc:
            if len(batch) == 1:
                batch[0].error = exc
                return
            # Nothing of the batch was kept: each op again, alone.
            for pending in batch:
                try:
                    with self._transaction() as db:
                        pending.value = pending.op(db)
                except BaseException as own:
                    pending.error = own
            self._count(len(batch), len(batch))
            return
        for pending, value in zip(batch, values, strict=True):
            pending.value = value
        self._count(1, len(batch))

    def _count(self, transactions: int, ops: int) -> None:
        with self._cond:
            self.batches += transactions
            self.ops += ops
        for _ in range(transactions):
            self._on_commit(ops // transactions)
