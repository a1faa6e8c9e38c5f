"""A region's circuit as its worker uses it: the breaker's decisions
(``scheduler.CircuitBreaker``) published to the store, and the region's queued
failover-"any" work handed to the other regions while the circuit keeps the
region from claiming.

Why divert: an open circuit stops the region claiming, so new work requested
there would otherwise leave only through the one half-open probe per cool-down,
while the other regions sit idle. Diverting puts that work in the global retry
queue (no attempt counted: it never ran), where every other region serving the
model picks it up first. Failover-"none" work is left queued: it waits for its
region. The divert runs when the circuit opens (first trip, or a failed probe)
and again every cool-down while the region still cannot claim, so work submitted
in the meantime flows too.
"""

from __future__ import annotations

import logging
import threading

from .scheduler import CallVerdict, CircuitBreaker, CircuitChange, CircuitState, Clock
from .store.base import Store, StoreError

logger = logging.getLogger(__name__)


class RegionCircuit:
    """One region's breaker, wired to the store. Thread-safe: the claim loop asks for
    allowances, the region's pool threads record verdicts."""

    def __init__(
        self, region: str, store: Store, threshold: int, cooldown_s: float, clock: Clock
    ) -> None:
        self.region = region
        self.store = store
        self.clock = clock
        self.cooldown_s = cooldown_s
        self.breaker = CircuitBreaker(threshold, cooldown_s, clock, self._changed)
        self._lock = threading.Lock()
        # While the region cannot claim: the clock time of the next divert (None: closed).
        self._next_divert: float | None = None

    @property
    def state(self) -> CircuitState:
        return self.breaker.state

    def start(self) -> None:
        """Publish the initial (closed) state, replacing what a previous run left."""
        self._publish(CircuitChange(CircuitState.CLOSED, None))

    def allowance(self, free: int) -> int:
        """How many executions the region may claim now (see CircuitBreaker.allowance)."""
        return self.breaker.allowance(free)

    def divert_if_due(self) -> None:
        """While the circuit is not closed, divert the region's queued failover-any work
        again once a cool-down has passed since the last divert: work submitted while
        the circuit is open, or while a half-open probe hangs, does not wait for it.
        The claim loop calls this on every turn, busy slots or not; a no-op when closed."""
        self._divert(only_if_due=True)

    def pause_s(self, poll: float) -> float:
        """How long the claim loop waits when the circuit allows nothing: until the
        probe is allowed, but at most ten polls (a stop request is noticed)."""
        until_probe = self.breaker.seconds_until_probe()
        return poll if until_probe is None else min(max(until_probe, 0.001), poll * 10)

    def claimed(self, count: int) -> None:
        """``count`` executions were just claimed: while half-open, that is the probe."""
        if count and self.breaker.state is CircuitState.HALF_OPEN:
            self.breaker.probe_started()

    def record(self, verdict: CallVerdict) -> None:
        """A call of the region finished with this verdict."""
        self.breaker.record(verdict)

    def _changed(self, change: CircuitChange) -> None:
        self._publish(change)
        if change.state is CircuitState.OPEN:
            self._divert(only_if_due=False)
        elif change.state is CircuitState.CLOSED:
            with self._lock:
                self._next_divert = None

    def _divert(self, only_if_due: bool) -> None:
        """Move the region's queued failover-any work to the global retry queue, and
        schedule the next divert one cool-down later."""
        now = self.clock()
        with self._lock:
            if only_if_due and (self._next_divert is None or now < self._next_divert):
                return
            self._next_divert = now + self.cooldown_s
        try:
            moved = self.store.divert_queued(self.region, now)
        except StoreError:
            # Not fatal: the work stays queued here and the next divert tries again.
            logger.exception("divert_queued failed", extra={"region": self.region})
            return
        if moved:
            logger.warning(
                "circuit open: queued work handed to other regions",
                extra={"region": self.region, "executions": moved},
            )

    def _publish(self, change: CircuitChange) -> None:
        if change.state is not CircuitState.CLOSED:
            logger.warning(
                "circuit %s",
                change.state.value,
                extra={"region": self.region, "open_until": change.open_until},
            )
        try:
            self.store.set_circuit(self.region, change.state.value, change.open_until)
        except StoreError:
            logger.exception("set_circuit failed", extra={"region": self.region})
