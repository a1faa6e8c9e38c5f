"""Wake-ups across dispatcher processes on PostgreSQL: LISTEN/NOTIFY.

A region's claim loop wakes at once for what its own process does (a slot freed, a
retry it scheduled: ``runtime.ThreadWakeup``), but work another process makes due -
a job submitted through the API process, a retry scheduled by the dispatcher on
another host, a lease that process released or reaped - it would only see at its
next poll. So every transaction that makes work claimable also runs
``pg_notify(CHANNEL, <due time>)`` (delivered when, and only if, it commits), and
each dispatcher process keeps one connection ``LISTEN``-ing: each notice calls
``on_due(due time)``, which wakes every region's loop when that work falls due
(D2 across processes without a tight poll). Notices of our own process come back
too (a spare wake-up, harmless).

Notices are a hint, never the truth: the claim still reads the store. One lost
(the listening connection dropped; PostgreSQL keeps no notice for a session that
was not listening) costs at most a poll interval, and after a reconnect
``on_due(0.0)`` wakes everyone once to look.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import psycopg

logger = logging.getLogger(__name__)

CHANNEL = "executor_service_due"
NOTIFY_SQL = "SELECT pg_notify('" + CHANNEL + "', %(due_at)s)"
# How long a listen waits before checking whether it was told to stop.
STOP_CHECK_S = 0.5
RECONNECT_PAUSE_S = 1.0


def payload(due_at: float) -> str:
    return f"{due_at:.6f}"


class DueListener:
    """A thread LISTEN-ing on its own autocommit connection until ``close``."""

    def __init__(
        self, conninfo: str, on_due: Callable[[float], None], connect_timeout_s: int = 10
    ) -> None:
        self._conninfo = conninfo
        self._on_due = on_due
        self._connect_timeout_s = connect_timeout_s
        self._stop = threading.Event()
        self.listening = threading.Event()  # set while LISTEN is in place (tests wait on it)
        self._thread = threading.Thread(target=self._run, name="store-listen", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        connected_before = False
        while not self._stop.is_set():
            try:
                with psycopg.connect(
                    self._conninfo, autocommit=True, connect_timeout=self._connect_timeout_s
                ) as conn:
                    conn.execute("LISTEN " + CHANNEL)
                    self.listening.set()
                    if connected_before:
                        self._deliver("0")  # notices were missed while we were away
                    connected_before = True
                    while not self._stop.is_set():
                        for notice in conn.notifies(timeout=STOP_CHECK_S):
                            self._deliver(notice.payload)
            except psycopg.Error as exc:
                self.listening.clear()
                if self._stop.is_set():
                    return
                logger.warning("store listener lost its connection (%s); reconnecting", exc)
                self._stop.wait(RECONNECT_PAUSE_S)
        self.listening.clear()

    def _deliver(self, text: str) -> None:
        try:
            due_at = float(text)
        except ValueError:
            logger.warning("ignored a malformed notice on %s: %r", CHANNEL, text[:100])
            return
        try:
            self._on_due(due_at)
        except Exception:  # a callback bug must not end the listening
            logger.exception("store listener callback failed")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(STOP_CHECK_S * 4 + 5)
