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
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import Overloaded
from .metrics import ADMISSION_LIMIT, ADMISSION_REJECTIONS, IN_FLIGHT

# gunicorn_config.py writes the files (slot-00000, ...) in the master, where importing
# this module would import prometheus_client too early.
SLOT_PREFIX = "slot-"


class _ReplicaSlots:
    """Slots shared by the processes of one replica: one ``flock``-ed file each.

    Opened in the worker (after the fork): a lock belongs to the open file, so
    descriptors inherited from the master would be shared by every worker. Within a
    process a second LOCK_EX on a file it already holds succeeds, hence ``_held``.
    """

    def __init__(self, directory: Path) -> None:
        paths = sorted(directory.glob(SLOT_PREFIX + "*"))
        if not paths:
            raise ValueError(f"no admission slot files in {directory}")
        self.fds = [os.open(p, os.O_RDWR) for p in paths]
        self._held: set[int] = set()
        self._lock = threading.Lock()
        self._random = random.Random()

    def try_acquire(self) -> int | None:
        n = len(self.fds)
        start = self._random.randrange(n)  # workers start apart: fewer busy slots tried
        with self._lock:
            for k in range(n):
                i = (start + k) % n
                if i in self._held:
                    continue
                try:
                    fcntl.flock(self.fds[i], fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
                self._held.add(i)
                return i
        return None

    def release(self, i: int) -> None:
        with self._lock:
            fcntl.flock(self.fds[i], fcntl.LOCK_UN)
            self._held.discard(i)


class Admission:
    def __init__(self, limit: int, retry_after_s: int, shared_dir: Path | None = None) -> None:
        if limit <= 0:
            raise ValueError("admission limit must be > 0")
        self.retry_after_s = retry_after_s
        self._shared = _ReplicaSlots(shared_dir) if shared_dir is not None else None
        self.limit = len(self._shared.fds) if self._shared is not None else limit
        # threading primitives become gevent ones when gunicorn's gevent worker patches them.
        self._slots = threading.BoundedSemaphore(limit)
        self._lock = threading.Lock()
        self.in_flight = 0
        ADMISSION_LIMIT.set(limit)

    def _refuse(self) -> Overloaded:
        ADMISSION_REJECTIONS.inc()
        return Overloaded(
            details={"limit": self.limit},
            headers={"Retry-After": str(self.retry_after_s)},
        )

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one slot for the duration of a model call, or raise Overloaded now."""
        shared: int | None = None
        if self._shared is not None:
            shared = self._shared.try_acquire()
            if shared is None:
                raise self._refuse()
        elif not self._slots.acquire(blocking=False):
            raise self._refuse()
        with self._lock:
            self.in_flight += 1
        IN_FLIGHT.inc()
        try:
            yield
        finally:
            IN_FLIGHT.dec()
            with self._lock:
                self.in_flight -= 1
            if self._shared is not None and shared is not None:
                self._shared.release(shared)
            else:
                self._slots.release()
