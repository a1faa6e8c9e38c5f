"""A (region, model)'s circuit as its worker uses it: the breaker's decisions
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
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from .scheduler import CallVerdict, CircuitBreaker, CircuitChange, CircuitState, Clock
from .store.base import Store, StoreError

if TYPE_CHECKING:
    from .pacing import Pace
    from .regions import Region
    from .worker import WorkerConfig

logger = logging.getLogger(__name__)


class RegionCircuit:
    """One breaker, wired to the store: the region's, or (``model`` given) one model's in
    the region, so one broken model never stalls the region's healthy ones; its divert
    then moves only that model's work. ``publish`` replaces the default publication
    (``store.set_circuit``): the region worker sums its models' circuits up.
    Thread-safe: the claim loop asks for allowances, the pool threads record verdicts."""

    def __init__(
        self,
        region: str,
        store: Store,
        threshold: int,
        cooldown_s: float,
        clock: Clock,
        model: str | None = None,
        publish: Callable[[CircuitChange], None] | None = None,
    ) -> None:
        self.region = region
        self.model = model
        self.publish = publish
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

    def record(self, verdict: CallVerdict, error: Mapping[str, Any] | None = None) -> None:
        """A call of the region finished with this verdict (and this error: what the job
        view shows as the failure that opened the circuit)."""
        self.breaker.record(verdict, error)

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
            if self.model is None:
                moved = self.store.divert_queued(self.region, now)
            else:
                moved = self.store.divert_queued(self.region, now, model=self.model)
        except StoreError:
            # Not fatal: the work stays queued here and the next divert tries again.
            logger.exception("divert_queued failed", extra={"region": self.region})
            return
        if moved:
            logger.warning(
                "circuit open: queued work handed to other regions",
                extra={"region": self.region, "model": self.model, "executions": moved},
            )

    def _publish(self, change: CircuitChange) -> None:
        if change.state is not CircuitState.CLOSED:
            logger.warning(
                "circuit %s",
                change.state.value,
                extra={
                    "region": self.region,
                    "model": self.model,
                    "open_until": change.open_until,
                },
            )
        if self.publish is not None:
            self.publish(change)
            return
        try:
            self.store.set_circuit(self.region, change.state.value, change.open_until)
        except StoreError:
            logger.exception("set_circuit failed", extra={"region": self.region})


_SEVERITY = {CircuitState.CLOSED: 0, CircuitState.HALF_OPEN: 1, CircuitState.OPEN: 2}


class ModelCircuits:
    """A region's circuits, one per model it serves: one broken model is held back on
    its own while the region's healthy models keep claiming. Each model's state is
    published with its pace (``paces.circuit``); the region's, for ``/queue`` and its
    gauge, is its worst model's (open while any model is open)."""

    def __init__(
        self,
        region: Region,
        store: Store,
        config: WorkerConfig,
        clock: Clock,
        on_pace: Callable[[str, Pace], None] = lambda _m, _p: None,
    ) -> None:
        self.region = region
        self.store = store
        self.on_pace = on_pace
        self._lock = threading.Lock()
        self._states: dict[str, CircuitChange] = {}
        self.by_model = {
            model: RegionCircuit(
                region.name,
                store,
                config.circuit_threshold,
                config.circuit_cooldown_s,
                clock,
                model=model,
                publish=self._publisher(model),
            )
            for model in region.models
        }

    def __getitem__(self, model: str) -> RegionCircuit:
        return self.by_model[model]

    def start(self) -> None:
        for circuit in self.by_model.values():
            circuit.start()

    def divert_if_due(self) -> None:
        for circuit in self.by_model.values():
            circuit.divert_if_due()

    def allowances(self, free: int) -> dict[str, int]:
        """Per model, how many it may claim now (0: its circuit is open)."""
        return {model: circuit.allowance(free) for model, circuit in self.by_model.items()}

    def pause_s(self, poll: float) -> float:
        """Every circuit allows nothing: wait until the first probe is due."""
        return min(circuit.pause_s(poll) for circuit in self.by_model.values())

    def _publisher(self, model: str) -> Callable[[CircuitChange], None]:
        return lambda change: self._changed(model, change)

    def _changed(self, model: str, change: CircuitChange) -> None:
        with self._lock:
            self._states[model] = change
            worst = max(self._states.values(), key=lambda c: _SEVERITY[c.state])
            untils = [c.open_until for c in self._states.values() if c.open_until]
        try:
            pace = self.store.update_pace(
                self.region.name,
                model,
                self.region.model_concurrency(model),
                lambda p: replace(
                    p,
                    circuit=change.state.value,
                    circuit_open_until=change.open_until,
                    circuit_since=change.since,
                    circuit_error=change.error,
                ),
            )
            self.on_pace(model, pace)
            self.store.set_circuit(
                self.region.name, worst.state.value, max(untils) if untils else None
            )
        except StoreError:
            logger.exception("publishing the circuit failed", extra={"region": self.region.name})
