"""Admission control: a limit on model calls in flight, per replica or per process.

Beyond the limit a request is refused at once (503 with Retry-After) instead
of waiting: a caller with somewhere else to go (the dispatcher, another
region) is better served by a fast "no" than by a slow "maybe".

Under gunicorn the limit is the replica's (workers x ES_MAX_IN_FLIGHT), shared by
its workers through one lock file per slot in a directory the master creates
(``ES_ADMISSION_DIR``). A per-process limit refused calls while the replica had
room: under gevent the kernel hands connections to workers unevenly, and 4 calls
on an idle 4 x 2 replica got a 503 in two runs of three. ``flock`` locks
are the kernel's: a worker killed in the middle of a call (SIGKILL, gunicorn's
timeout, the OOM killer) gives its slots back as it dies, so none leaks.
Without the directory (tests, the Flask dev server) the limit is this process's.
"""

from __future__ import annotations

import fcntl
import os
import random
from collections import deque
from pathlib import Path
from types import TracebackType

from ..errors import Overloaded
from .metrics import ADMISSION_LIMIT, ADMISSION_REJECTIONS, IN_FLIGHT

# gunicorn_config.py writes the files (slot-00000, ...) in the master, where importing
# this module would import prometheus_client too early.
SLOT_PREFIX = "slot-"


class _Slots:
    """The slots this process may take, without a lock: ``deque.popleft`` and ``append``
    are atomic (under gevent too), so no two threads ever hold the same index. A slot
    found busy in another process goes to the back, a slot given back to the front (the
    next call reuses it: on a quiet replica each worker keeps to its own few slots, and
    the other workers, which start from other slots, seldom try them).

    Shared by the processes of one replica (``directory``): one ``flock``-ed file per
    slot, opened in the worker (after the fork: a lock belongs to the open file, so
    descriptors inherited from the master would be shared by every worker). Without it
    the slots are this process's alone and taking one is popping its index.
    """

    def __init__(self, limit: int, directory: Path | None) -> None:
        self.fds: list[int] = []
        if directory is not None:
            paths = sorted(directory.glob(SLOT_PREFIX + "*"))
            if not paths:
                raise ValueError(f"no admission slot files in {directory}")
            self.fds = [os.open(p, os.O_RDWR) for p in paths]
            limit = len(paths)
        self.limit = limit
        order = list(range(limit))
        random.shuffle(order)  # workers start apart: fewer slots tried that another holds
        self._free: deque[int] = deque(order)

    def try_acquire(self) -> int | None:
        free = self._free
        for _ in range(self.limit):
            try:
                i = free.popleft()
            except IndexError:  # every slot is held in this process
                return None
            if not self.fds:
                return i
            try:
                fcntl.flock(self.fds[i], fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # held by another worker
                free.append(i)
                continue
            return i
        return None

    def release(self, i: int) -> None:
        if self.fds:
            fcntl.flock(self.fds[i], fcntl.LOCK_UN)
        self._free.appendleft(i)

    @property
    def held(self) -> int:
        """Slots held in this process (those being tried count too, for an instant)."""
        return self.limit - len(self._free)


class _Slot:
    """``with admission.slot():`` - a class, not a generator: it is on every call's path."""

    __slots__ = ("_admission", "_index")

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self._index: int | None = None

    def __enter__(self) -> None:
        admission = self._admission
        self._index = admission._slots.try_acquire()
        if self._index is None:
            raise admission._refuse()
        IN_FLIGHT.inc()

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        if self._index is not None:
            IN_FLIGHT.dec()
            index, self._index = self._index, None
            self._admission._slots.release(index)


class Admission:
    def __init__(self, limit: int, retry_after_s: int, shared_dir: Path | None = None) -> None:
        if limit <= 0:
            raise ValueError("admission limit must be > 0")
        self.retry_after_s = retry_after_s
        self._slots = _Slots(limit, shared_dir)
        self.limit = self._slots.limit
        ADMISSION_LIMIT.set(limit)

    @property
    def in_flight(self) -> int:
        """Calls holding a slot in this process."""
        return self._slots.held

    def _refuse(self) -> Overloaded:
        ADMISSION_REJECTIONS.inc()
        return Overloaded(
            details={"limit": self.limit},
            headers={"Retry-After": str(self.retry_after_s)},
        )

    def slot(self) -> _Slot:
        """Hold one slot for the duration of a model call, or raise Overloaded now."""
        return _Slot(self)
