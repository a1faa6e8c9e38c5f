"""The memory store's hedged calls (part of ``MemoryStore``): ``SQLHedges``'s steps
(sql_hedges.py) on its dicts, with the same rules. ``seats`` is the hedge_seats table:
a hedge in flight, or the loser of a hedge race still running, each holding a seat of
its region until its call ends (``end_seat``) or surely has (its ``lease_expires_at``,
then the reaper frees it)."""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from executor_service.dispatcher import pacing, rules
from executor_service.dispatcher.pacing import Pace
from executor_service.dispatcher.rules import HedgeRequest
from executor_service.dispatcher.store import records
from executor_service.dispatcher.store.models import Attempt, Claim, State

if TYPE_CHECKING:
    from executor_service.dispatcher.store.memory import ExecutionRow, JobRow


@dataclass
class Seat:
    """One row of hedge_seats."""

    token: str
    execution_id: int
    region: str
    model: str
    number: int  # the call's attempt-log number
    hedge_of: str | None  # a hedge: the lease token it races; None: a race's loser
    started_at: float
    lease_expires_at: float


def _json(value: Any) -> Any:
    return None if value is None else json.loads(json.dumps(value))


class MemoryHedges:
    """Mixed into MemoryStore, whose state and helpers it uses."""

    rows: dict[int, ExecutionRow]
    jobs: dict[str, JobRow]
    seats: dict[str, Seat]
    attempts: dict[int, list[Attempt]]
    _lock: threading.RLock

    if TYPE_CHECKING:  # MemoryStore's

        def _check_open(self) -> None: ...

        def _where(self, keep: Callable[[ExecutionRow], bool]) -> Iterator[ExecutionRow]: ...

        def _held(self, execution_id: int, token: str) -> ExecutionRow | None: ...

        def _pace(self, region: str, model: str, max_limit: int) -> Pace: ...

        pace_rows: dict[tuple[str, str], Pace]

    def _seats_in(self, region: str) -> int:
        return sum(1 for s in self.seats.values() if s.region == region)

    def _seats_expired(self, now: float) -> None:
        for token in [t for t, s in self.seats.items() if s.lease_expires_at < now]:
            del self.seats[token]

    def hedge(self, request: HedgeRequest) -> Claim | None:
        claim = request.for_model()
        region, model = claim.region.name, request.model
        with self._lock:
            self._check_open()
            leased = sum(
                1
                for _ in self._where(lambda r: r.state == "leased" and r.executed_region == region)
            )
            if claim.region.concurrency - leased - self._seats_in(region) <= 0:
                return None
            r = self._held(request.execution_id, request.token)
            if r is None or r.hedged_lease == r.lease_token:
                return None
            job = self.jobs[r.job_id].job
            if sum(x.hedges for x in self.rows.values() if x.job_id == r.job_id) >= (
                request.max_hedges
            ):
                return None
            paces = {model: self._pace(region, model, claim.max_limit(model))}
            in_flight = Counter(
                x.model
                for x in self._where(lambda x: x.state == "leased")
                if x.executed_region == region
            )
            in_flight.update(s.model for s in self.seats.values() if s.region == region)
            groups, _held = rules.plan_claim(claim, paces, in_flight, 1)
            if not groups:
                return None
            reserved = 0
            if groups[0].budgeted:
                budget = claim.budget(model)
                cost = pacing.estimate_tokens(len(r.question), job.params.get("max_tokens"))
                taken, paces[model] = pacing.take(paces[model], budget, [cost])
                if not taken:
                    return None
                reserved = cost if budget.tpm is not None else 0
            self.pace_rows[(region, model)] = paces[model]
            r.hedges, r.hedged_lease = r.hedges + 1, r.lease_token
            token = records.new_token()
            self.seats[token] = Seat(
                token,
                r.id,
                region,
                model,
                r.attempts + r.deferrals + r.hedges,
                request.token,
                claim.now,
                claim.expires,
            )
            hedge = records.claim_from_row(
                vars(r),
                loads=_json,
                token=token,
                source="hedge",
                region=region,
                params=_json(job.params),
                lease_expires_at=claim.expires,
                reserved_tokens=reserved,
                deadline_at=job.deadline_at,
            )
            return records.as_hedge(hedge, request.token)

    def complete_hedge(
        self, execution_id: int, token: str, result: dict[str, Any], now: float, started_at: float
    ) -> bool:
        with self._lock:
            self._check_open()
            seat = self.seats.get(token)
            if seat is None or seat.execution_id != execution_id or seat.hedge_of is None:
                return False
            r = self._held(execution_id, seat.hedge_of)
            if r is None:  # the first call's result, a reap or a release came first
                return False
            first_region, first_expires, first_started = (
                r.executed_region,
                r.lease_expires_at,
                r.leased_at,
            )
            r.state, r.output, r.result = (
                State.SUCCEEDED.value,
                records.output_of(result),
                _json(result),
            )
            r.finished_at, r.lease_expires_at, r.executed_region = now, None, seat.region
            del self.seats[token]
            self._log_call(r.id, seat.number, seat.region, started_at, now, None)
            assert first_region is not None and first_expires is not None
            self.seats[seat.hedge_of] = Seat(
                seat.hedge_of,
                r.id,
                first_region,
                seat.model,
                seat.number - 1,
                None,
                first_started or started_at,
                first_expires,
            )
            return True

    def end_seat(
        self, execution_id: int, token: str, error: dict[str, Any], now: float, started_at: float
    ) -> bool:
        with self._lock:
            self._check_open()
            seat = self.seats.get(token)
            if seat is None or seat.execution_id != execution_id:
                return False
            del self.seats[token]
            self._log_call(execution_id, seat.number, seat.region, started_at, now, error)
            return True

    def _log_call(
        self, execution_id: int, number: int, region: str, started: float, now: float, error: Any
    ) -> None:
        self.attempts.setdefault(execution_id, []).append(
            Attempt(number, region, started, now, error is None, _json(error))
        )
