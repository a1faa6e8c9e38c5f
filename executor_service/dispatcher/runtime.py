"""The runtime's two primitives, passed in to every region worker so a test can step it:
where calls run (a ``Pool``) and how a claim loop waits (a ``Wakeup``).

    DaemonPool / ThreadWakeup   production: daemon threads, a condition variable
    InlinePool / ManualWakeup   tests: calls run in the caller's thread (at once, or when
                                the test says), waiting never blocks; no threads, no sleeps
"""

from __future__ import annotations

import heapq
import logging
import queue
import threading
from collections.abc import Callable
from typing import Protocol

logger = logging.getLogger(__name__)

Task = Callable[[], None]
Clock = Callable[[], float]


class Pool(Protocol):
    """Runs a region's calls."""

    def submit(self, task: Task) -> None: ...

    def shutdown(self) -> None: ...


class DaemonPool:
    """A fixed set of daemon threads running submitted calls. Daemon, unlike
    ``ThreadPoolExecutor``, so a call still running after the shutdown grace
    (its lease already released) cannot keep the process alive."""

    def __init__(self, size: int, name: str) -> None:
        self._queue: queue.SimpleQueue[Task | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
            for i in range(size)
        ]
        for thread in self._threads:
            thread.start()

    def _work(self) -> None:
        while True:
            task = self._queue.get()
            if task is None:
                return
            try:
                task()
            except Exception:  # a task must not kill its thread; the trace is logged
                logger.exception("pool task failed")

    def submit(self, task: Task) -> None:
        self._queue.put(task)

    def shutdown(self) -> None:
        for _ in self._threads:
            self._queue.put(None)


class InlinePool:
    """Runs each call in the caller's thread: at once, or (``deferred``) when the test calls
    ``run_pending``, so it can look at the store while calls are "in flight"."""

    def __init__(self, deferred: bool = False) -> None:
        self.deferred = deferred
        self.pending: list[Task] = []

    def submit(self, task: Task) -> None:
        if self.deferred:
            self.pending.append(task)
        else:
            task()

    def run_pending(self) -> int:
        """Run the calls submitted so far; returns how many ran."""
        tasks, self.pending = self.pending, []
        for task in tasks:
            task()
        return len(tasks)

    def shutdown(self) -> None:
        self.pending.clear()


class Wakeup(Protocol):
    """What a claim loop waits on: woken at once (``wake``: a slot is free, work was
    reaped, stop), at a clock time (``wake_at``: a retry falls due), or after a timeout."""

    def wake(self) -> None: ...

    def wake_at(self, when: float) -> None: ...

    def wait(self, timeout: float) -> None: ...


class ThreadWakeup:
    """A Wakeup on a condition variable, times from ``clock``."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._cond = threading.Condition()
        self._woken = False
        self._wake_times: list[float] = []  # heap of clock times a due retry wakes us

    def wake(self) -> None:
        with self._cond:
            self._woken = True
            self._cond.notify_all()

    def wake_at(self, when: float) -> None:
        with self._cond:
            heapq.heappush(self._wake_times, when)
            self._cond.notify_all()

    def wait(self, timeout: float) -> None:
        with self._cond:
            now = self.clock()
            while self._wake_times and self._wake_times[0] <= now:
                heapq.heappop(self._wake_times)
                self._woken = True
            if self._wake_times:
                timeout = min(timeout, self._wake_times[0] - now)
            if not self._woken and timeout > 0:
                self._cond.wait(timeout)
            self._woken = False


class ManualWakeup:
    """A Wakeup that never blocks: it records what was asked, for a test to assert on."""

    def __init__(self) -> None:
        self.woken = 0
        self.wake_times: list[float] = []
        self.waits: list[float] = []

    def wake(self) -> None:
        self.woken += 1

    def wake_at(self, when: float) -> None:
        heapq.heappush(self.wake_times, when)

    def wait(self, timeout: float) -> None:
        self.waits.append(timeout)
