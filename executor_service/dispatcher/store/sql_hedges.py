"""The SQL stores' hedged calls (``Store.hedge``, ``complete_hedge``, ``end_seat``), the
same on SQLite and PostgreSQL apart from the region lock (``_lock_region``).

A hedge is a second call of a leased execution. It holds a seat of its own (a row of
``hedge_seats``), which a claim counts with the region's leases (``count_leased``), so
taking it under the region's claim lock keeps the region within its concurrency across
processes. Its attempt-log number is the execution's ``hedges`` counter's (one hedge per
lease: ``hedged_lease``). Fencing: the hedge's answer is written only while the lease
it races is current, in the same statement that ends that lease (``complete_hedge``),
so the execution succeeds once, with the first answer; the raced call's token is no
longer a lease, so its own answer is fenced out, while its seat stays taken (a seat row
with its token) until its call ends. Lock order: the region lock, the seat, the
execution (claims take the region lock, then executions; results the execution only).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from executor_service.dispatcher import pacing, rules
from executor_service.dispatcher.pacing import Pace
from executor_service.dispatcher.rules import HedgeRequest
from executor_service.dispatcher.store import records
from executor_service.dispatcher.store.models import Claim


class _Handle(Protocol):
    def execute(self, query: str, params: Mapping[str, Any] = ..., /) -> Any: ...


DB = TypeVar("DB", bound=_Handle)


class SQLHedges(Generic[DB]):
    """hedge / complete_hedge / end_seat of a SQL store (mixed into SQLStore)."""

    queries: ClassVar[Mapping[str, str]]

    @abstractmethod
    def _transaction(self, write: bool = False) -> AbstractContextManager[DB]: ...

    @staticmethod
    @abstractmethod
    def _loads(value: Any) -> Any: ...

    @staticmethod
    @abstractmethod
    def _dumps(value: Any) -> Any: ...

    @abstractmethod
    def _pace_for_update(self, db: DB, region: str, model: str, max_limit: int) -> Pace: ...

    def _lock_region(self, db: DB, region: str) -> None:
        """Take the region's claim lock for the rest of the transaction (PostgreSQL: its
        advisory lock). SQLite's write transaction (BEGIN IMMEDIATE) already is one."""

    def hedge(self, request: HedgeRequest) -> Claim | None:
        claim = request.for_model()
        region, model = claim.region.name, request.model
        lease = {"id": request.execution_id, "token": request.token}
        with self._transaction(write=True) as db:
            self._lock_region(db, region)
            seats = db.execute(self.queries["count_leased"], {"region": region}).fetchone()
            if claim.region.concurrency - int(seats["n"]) <= 0:
                return None
            row = db.execute(self.queries["hedge_target"], lease).fetchone()
            if row is None:
                return None
            job = {"job_id": row["job_id"]}
            if db.execute(self.queries["job_hedges"], job).fetchone()["n"] >= request.max_hedges:
                return None
            before = self._pace_for_update(db, region, model, claim.max_limit(model))
            paces = {model: before}
            in_flight = {
                r["model"]: r["n"]
                for r in db.execute(self.queries["leased_by_model"], {"region": region})
            }
            groups, _held = rules.plan_claim(claim, paces, in_flight, 1)
            if not groups:
                return None
            params = self._loads(row["params"])
            reserved = 0
            if groups[0].budgeted:
                budget = claim.budget(model)
                cost = pacing.estimate_tokens(len(row["question"]), params.get("max_tokens"))
                taken, paces[model] = pacing.take(paces[model], budget, [cost])
                if not taken:
                    return None
                reserved = cost if budget.tpm is not None else 0
            counted = db.execute(self.queries["hedge_count"], lease).fetchone()
            if counted is None:  # this lease was hedged already
                return None
            if paces[model] != before:
                db.execute(self.queries["pace_put"], records.pace_args(paces[model], self._dumps))
            token = records.new_token()
            seat = {
                "token": token,
                "id": request.execution_id,
                "region": region,
                "model": model,
                "number": counted["call_number"],
                "hedge_of": request.token,
                "started_at": claim.now,
                "expires": claim.expires,
            }
            db.execute(self.queries["seat_insert"], seat)
        hedge = records.claim_from_row(
            {**row, "hedges": counted["hedges"]},
            loads=self._loads,
            token=token,
            source="hedge",
            region=region,
            params=params,
            lease_expires_at=claim.expires,
            reserved_tokens=reserved,
            deadline_at=row["deadline_at"],
        )
        return records.as_hedge(hedge, request.token)

    def complete_hedge(
        self, execution_id: int, token: str, result: dict[str, Any], now: float, started_at: float
    ) -> bool:
        key = {"id": execution_id, "token": token}
        with self._transaction(write=True) as db:
            seat = db.execute(self.queries["seat_get"], key).fetchone()
            if seat is None or seat["hedge_of"] is None:
                return False
            raced = {"id": execution_id, "token": seat["hedge_of"]}
            first = db.execute(self.queries["hedge_target"], raced).fetchone()
            if first is None:  # the first call's result, a reap or a release came first
                return False
            args = {
                "id": execution_id,
                "hedge_of": seat["hedge_of"],
                "output": records.output_of(result),
                "result": self._dumps(result),
                "now": now,
                "region": seat["region"],
            }
            db.execute(self.queries["complete_hedge"], args)
            db.execute(self.queries["seat_delete"], key)
            self._log_call(db, execution_id, seat["number"], seat["region"], started_at, now, None)
            # The raced call still runs: its seat stays taken until it ends, or until its
            # lease would have expired (it covers the call's deadline).
            loser = {
                "token": seat["hedge_of"],
                "id": execution_id,
                "region": first["executed_region"],
                "model": seat["model"],
                "number": seat["number"] - 1,
                "hedge_of": None,
                "started_at": first["leased_at"],
                "expires": first["lease_expires_at"],
            }
            db.execute(self.queries["seat_insert"], loser)
        return True

    def end_seat(
        self, execution_id: int, token: str, error: dict[str, Any], now: float, started_at: float
    ) -> bool:
        key = {"id": execution_id, "token": token}
        with self._transaction(write=True) as db:
            seat = db.execute(self.queries["seat_delete"], key).fetchone()
            if seat is None:
                return False
            dumped = self._dumps(error)
            self._log_call(
                db, execution_id, seat["number"], seat["region"], started_at, now, dumped
            )
        return True

    def _log_call(
        self,
        db: DB,
        execution_id: int,
        number: int,
        region: str,
        started_at: float,
        now: float,
        error: Any,
    ) -> None:
        attempt = {
            "id": execution_id,
            "number": number,
            "region": region,
            "started_at": started_at,
            "now": now,
            "ok": error is None,
            "error": error,
        }
        db.execute(self.queries["insert_attempt"], attempt)
