"""Admission control: a per-process limit on model calls in flight.

Beyond the limit a request is refused at once (503 with Retry-After) instead
of waiting: a caller with somewhere else to go (the dispatcher, another
region) is better served by a fast "no" than by a slow "maybe".
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from ..errors import Overloaded
from .metrics import ADMISSION_LIMIT, ADMISSION_REJECTIONS, IN_FLIGHT


class Admission:
    def __init__(self, limit: int, retry_after_s: int) -> None:
        if limit <= 0:
            raise ValueError("admission limit must be > 0")
        self.limit = limit
        self.retry_after_s = retry_after_s
        # threading primitives become gevent ones when gunicorn's gevent worker patches them.
        self._slots = threading.BoundedSemaphore(limit)
        self._lock = threading.Lock()
        self.in_flight = 0
        ADMISSION_LIMIT.set(limit)

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one slot for the duration of a model call, or raise Overloaded now."""
        if not self._slots.acquire(blocking=False):
            ADMISSION_REJECTIONS.inc()
            raise Overloaded(
                details={"limit": self.limit},
                headers={"Retry-After": str(self.retry_after_s)},
            )
        with self._lock:
            self.in_flight += 1
        IN_FLIGHT.inc()
        try:
            yield
        finally:
            IN_FLIGHT.dec()
            with self._lock:
                self.in_flight -= 1
            self._slots.release()
