"""The operations the SQLite and PostgreSQL stores run the same way, written once.

Both stores keep their SQL as named queries (``sql/queries_<dialect>.sql``) and
run them with named parameters through a DB-API handle (a ``sqlite3.Connection``,
a psycopg ``Cursor``) that returns dict-like rows. Wherever the two differ only
in the text of a query, in how a JSON value is read and written, and in how a
transaction is opened, the operation lives here, on top of these hooks:

- ``queries``: the store's named queries (``sql_files.load_queries``);
- ``_loads`` / ``_dumps``: a JSON column's value as Python / a JSON parameter;
- ``_transaction(write)``: one transaction, yielding the handle. ``write`` says it
  will write: SQLite takes the write lock up front (``BEGIN IMMEDIATE``),
  PostgreSQL ignores it (row locks do that job);
- ``_list``: a list parameter (a JSON array on SQLite, an array on PostgreSQL);
- ``_insert_job``, ``_insert_executions``, ``_own_retries``, ``_queue_regions``,
  ``_expired_leases``: the steps of create_job, claim (step 2), queue_stats and
  reap whose SQL differs in shape, not only in dialect.

The result writes (complete, fail, defer) live in ``sql_results.py`` (``ResultWrites``,
which this class inherits): group-committed, and announcing work due to other processes.
Hedged calls (hedge, complete_hedge, end_seat) live in ``sql_hedges.py``.

Every decision is ``rules.py``'s: the claim order (``rules.pick`` over this store's
``ClaimQueues``), what a failed, released or reaped lease becomes. fail, release and
reap read what the rule needs (the job's cancel flag, the queue a lease came from)
with the named query ``lease_of`` - which on PostgreSQL locks the job row FOR SHARE
before the execution, the lock order cancel_job uses - then write the rule's
answer. What each store keeps is where the two really differ: claim itself (a region
advisory lock and batch lease against ``BEGIN IMMEDIATE`` and a lease per row),
heartbeat (one statement against a loop), migrations and connection handling.
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from executor_service.dispatcher import pacing, rules
from executor_service.dispatcher.pacing import Pace
from executor_service.dispatcher.rules import ClaimRequest
from executor_service.dispatcher.store import records
from executor_service.dispatcher.store.base import (
    IdempotencyConflict,
    Job,
    NewJob,
    QueueStats,
    RegionQueue,
    RegionSpec,
    Store,
)
from executor_service.dispatcher.store.models import Claims
from executor_service.dispatcher.store.sql_hedges import SQLHedges
from executor_service.dispatcher.store.sql_results import ResultWrites
from executor_service.dispatcher.store.sql_workbench import SQLWorkbenchOps


class SQLResult(Protocol):
    """What running a statement gives back (``sqlite3.Cursor``, psycopg ``Cursor``)."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class SQLHandle(Protocol):
    """What a transaction yields: runs one statement with named parameters."""

    def execute(self, query: str, params: Mapping[str, Any] = ..., /) -> SQLResult: ...


DB = TypeVar("DB", bound=SQLHandle)


class SQLStore(ResultWrites[DB], SQLHedges[DB], SQLWorkbenchOps, Store, Generic[DB]):
    """The Store operations common to the SQL stores; ``DB`` is the handle type
    their transactions yield, so each store's hooks get its own handle."""

    queries: ClassVar[Mapping[str, str]]

    # -- hooks ----------------------------------------------------------------
    @staticmethod
    @abstractmethod
    def _loads(value: Any) -> Any:
        """A JSON column's value as read from the database, as Python (None stays None)."""

    @staticmethod
    @abstractmethod
    def _dumps(value: Any) -> Any:
        """A Python value as the parameter for a JSON column."""

    @abstractmethod
    def _transaction(self, write: bool = False) -> AbstractContextManager[DB]:
        """One transaction (committed on success, rolled back on error) yielding the
        handle, and the one place driver errors become StoreError. ``write``: the
        transaction writes, so a store that locks the database takes its lock first."""

    @staticmethod
    @abstractmethod
    def _list(values: Sequence[Any]) -> Any:
        """A list as a query parameter (``IN``/``ANY`` of a claim's models, taken ids)."""

    @abstractmethod
    def _expired_leases(self, db: DB, now: float) -> list[records.Row]:
        """Reap's rows: every lease expired by ``now`` with id, attempts, max_attempts,
        executed_region, leased_at and its job's ``cancelled``, locked for the update
        (PostgreSQL: jobs first, then the executions, skipping rows another holds)."""

    @abstractmethod
    def _insert_job(self, db: DB, job: NewJob, args: dict[str, Any]) -> tuple[records.Row, bool]:
        """Insert the jobs row (``args`` are the insert_job parameters) and return it
        with True, or, if the tenant already used ``job.idempotency_key``, return that
        job's row with False instead."""

    @abstractmethod
    def _insert_executions(self, db: DB, rows: Iterable[tuple[Any, ...]]) -> None:
        """Insert new executions, rows in ``records.NEW_EXECUTION_COLUMNS`` order."""

    @abstractmethod
    def _queue_regions(self, db: DB, names: list[str]) -> list[records.Row]:
        """The queue_region counts and circuit of each region, in ``names`` order."""

    @abstractmethod
    def _own_retries(self, db: DB, args: dict[str, Any], taken: list[int], n: int) -> list[int]:
        """Claim step 2: up to ``n`` of the region's own due retries (``args`` are the
        claim's parameters), not in ``taken``, in claim order; a store whose
        claimers run concurrently locks each one it returns."""

    @property
    def _logger(self) -> logging.Logger:
        """The logger of the concrete store's module, so its records keep their name."""
        return logging.getLogger(type(self).__module__)

    # -- jobs -----------------------------------------------------------------
    def create_job(self, job: NewJob, now: float) -> tuple[Job, bool]:
        args = {
            **vars(job),
            "id": records.new_job_id(),
            "failover": job.failover.value,
            "questions": self._dumps(job.questions),
            "models": self._dumps(job.models),
            "regions_by_model": self._dumps(job.regions_by_model),
            "params": self._dumps(job.params),
            "tags": self._dumps(job.tags),
            "total": records.count_executions(job),
            "now": now,
            "deadline_at": None if job.deadline_s is None else now + job.deadline_s,
        }
        with self._transaction(write=True) as db:
            row, created = self._insert_job(db, job, args)
            if not created:
                if row["request_hash"] != job.request_hash:
                    raise IdempotencyConflict(
                        f"idempotency key {job.idempotency_key!r} was used for another request"
                    )
                return records.job_from_row(row, self._loads), False
            self._insert_executions(db, records.execution_rows(job, row["id"], now, self._dumps))
            self._announce(db, now)
        self._logger.info("job created", extra={"job_id": row["id"], "tenant": job.tenant})
        return records.job_from_row(row, self._loads), True

    def get_job(self, tenant: str, job_id: str) -> Job | None:
        with self._transaction() as db:
            row = db.execute(self.queries["get_job"], {"id": job_id, "tenant": tenant}).fetchone()
        return None if row is None else records.job_from_row(row, self._loads)

    def job_counts(self, job_id: str) -> dict[str, dict[str, int]]:
        with self._transaction() as db:
            rows = db.execute(self.queries["job_counts"], {"job_id": job_id}).fetchall()
        counts: dict[str, dict[str, int]] = {}
        for row in rows:
            counts.setdefault(row["requested_region"], {})[row["state"]] = row["n"]
        return counts

    def cancel_job(self, tenant: str, job_id: str, now: float) -> int:
        args = {"job_id": job_id, "tenant": tenant, "now": now}
        with self._transaction(write=True) as db:
            # The job row first: PostgreSQL's fail/release/reap lock it before the execution.
            if not db.execute(self.queries["cancel_job"], args).rowcount:
                return 0
            cancelled = db.execute(self.queries["cancel_executions"], args).rowcount
        self._logger.info("job cancelled", extra={"job_id": job_id, "cancelled": cancelled})
        return cancelled

    def job_finished(self, job_id: str) -> bool:
        with self._transaction() as db:
            row = db.execute(self.queries["job_unfinished"], {"job_id": job_id}).fetchone()
        return row is None

    # -- scheduling -----------------------------------------------------------
    def _claim_args(self, request: ClaimRequest) -> dict[str, Any]:
        """The named parameters every claim query takes."""
        return {
            "region": request.region.name,
            "models": self._list(sorted(request.region.models)),
            "now": request.now,
            "expires": request.expires,
            "worker": request.worker,
            "handoff_due": request.handoff_due,
            "stale_before": request.stale_before,
        }

    def release(self, execution_id: int, token: str, now: float) -> bool:
        lease = {"id": execution_id, "token": token}
        with self._transaction(write=True) as db:
            row = db.execute(self.queries["lease_of"], lease).fetchone()
            if row is None:
                return False
            to = rules.after_release(
                row["claimed_from"], bool(row["cancelled"]), row["last_region"], now
            )
            args = {**lease, **self._transition(to), "executed_region": to.executed_region}
            released = bool(db.execute(self.queries["release"], args).rowcount)
            if released and to.due_at is not None:
                self._announce(db, to.due_at)
            return released

    def reap_expired(self, now: float, max_backoff_s: float = 0.0) -> int:
        error = self._dumps(rules.LEASE_EXPIRED_ERROR)
        with self._transaction(write=True) as db:
            expired = self._expired_leases(db, now)
            for row in expired:
                to = rules.after_lease_expired(
                    row["attempts"],
                    row["max_attempts"],
                    bool(row["cancelled"]),
                    now,
                    now + max_backoff_s,
                )
                args = {"id": row["id"], **self._transition(to), "error": error, "now": now}
                db.execute(self.queries["reap_one"], args)
                attempt = {
                    "id": row["id"],
                    "number": row["attempts"] + row["deferrals"] + row["hedges"],
                    "region": row["executed_region"],
                    "started_at": row["leased_at"],
                    "now": now,
                    "ok": False,
                    "error": error,
                }
                db.execute(self.queries["insert_attempt"], attempt)
            if expired:
                self._announce(db, now)
            db.execute(self.queries["seats_expired"], {"now": now})  # calls surely ended
        if expired:
            self._logger.warning("reaped %d expired leases", len(expired))
        return len(expired)

    # -- the claim's reads and its pacing (rules.plan_claim, pacing.py) -----------
    def _claim_reads(self, db: DB, args: dict[str, Any], request: ClaimRequest) -> ClaimState:
        """What a claim reads before it picks, after the region's lock (SQLite: the write
        lock; PostgreSQL overrides this to send them in one round trip after its advisory
        lock): the region's leases per model, its pacing rows locked, whether any retry is
        due, the tenants with queued work here and their leases here."""
        q = self.queries
        leased = {r["model"]: r["n"] for r in db.execute(q["leased_by_model"], args)}
        paces = self._paces_of_claim(db, request, db.execute(q["claim_paces"], args).fetchall())
        due = bool(db.execute(q["retries_due"], args).fetchone()["due"])
        tenants = [r["tenant"] for r in db.execute(q["queued_tenants"], args)]
        by_tenant = {r["tenant"]: r["n"] for r in db.execute(q["leased_by_tenant"], args)}
        return ClaimState(leased, paces, due, tenants, by_tenant)

    def _paces_of_claim(
        self, db: DB, request: ClaimRequest, rows: Sequence[records.Row]
    ) -> dict[str, Pace]:
        """Every model's pace from the claim_paces rows; the rows missing (a model's first
        claim) are created first (pacing.Pace.initial) and read again, locked."""
        region, models = request.region.name, sorted(request.region.models)
        found = {r["model"]: records.pace_from_row(r, self._loads) for r in rows}
        missing = [m for m in models if m not in found]
        if missing:
            limits = [request.max_limit(m) for m in missing]
            key = {"region": region, "missing": self._list(missing), "limits": self._list(limits)}
            db.execute(self.queries["claim_paces_insert"], key)
            again = {"region": region, "models": self._list(missing)}
            for r in db.execute(self.queries["claim_paces"], again):
                found[r["model"]] = records.pace_from_row(r, self._loads)
        paces = {}
        for model in models:
            pace, max_limit = found[model], request.max_limit(model)
            if pace.max_limit != max_limit:  # the regions file changed
                pace = pacing.with_max_limit(pace, max_limit)
            paces[model] = pace
        return paces

    def _pace_for_update(self, db: DB, region: str, model: str, max_limit: int) -> Pace:
        """The (region, model)'s pacing row, created at first use, locked (PostgreSQL:
        FOR UPDATE; SQLite: the write lock) until the transaction ends."""
        key = {"region": region, "model": model}
        row = db.execute(self.queries["pace_get"], key).fetchone()
        if row is None:
            db.execute(self.queries["pace_insert"], {**key, "max_limit": max_limit})
            row = db.execute(self.queries["pace_get"], key).fetchone()
        pace = records.pace_from_row(row, self._loads)
        if pace.max_limit != max_limit:  # the regions file changed
            pace = pacing.with_max_limit(pace, max_limit)
        return pace

    def _paced_pick(
        self, db: DB, args: dict[str, Any], request: ClaimRequest, free: int, state: ClaimState
    ) -> tuple[list[tuple[int, rules.Source, int]], dict[str, Any], list[Pace]]:
        """The claim inside its transaction, after its reads (``state``): let
        ``rules.plan_claim`` say which models may take how many, pick each group in
        the claim order, trim a budgeted model's picks to what its buckets hold
        (``pacing.take`` on each execution's estimated tokens). Returns (id, source,
        reserved tokens) to lease, the models held back (with why), and the paces
        that changed (the caller writes them in the claim's transaction)."""
        paces = dict(state.paces)
        in_flight = state.leased if rules.counts_in_flight(request, paces) else {}
        groups, held = rules.plan_claim(request, paces, in_flight, free)
        picked: list[tuple[int, rules.Source, int]] = []
        for group in groups:
            n = min(group.limit, free - len(picked))
            if n <= 0:
                break
            group_args = {**args, "models": self._list(list(group.models))}
            ids = rules.pick(_SQLQueues(self, db, group_args, state), n, request.tenant_batch)
            if not group.budgeted:
                picked += [(i, source, 0) for i, source in ids]
                continue
            model = group.models[0]
            budget = request.budget(model)
            costs = self._costs(db, [i for i, _ in ids])
            estimates = [costs[i] for i, _ in ids]
            taken, paces[model] = pacing.take(paces[model], budget, estimates)
            reserve = budget.tpm is not None
            picked += [
                (i, source, cost if reserve else 0)
                for (i, source), cost in zip(ids[:taken], estimates[:taken], strict=True)
            ]
            if taken < len(ids):
                held[model] = pacing.Allowance(0, "budget")
        changed = [pace for model, pace in paces.items() if pace != state.paces[model]]
        return picked, held, changed

    def _claims(
        self, request: ClaimRequest, picked: Sequence[tuple[int, rules.Source, int]],
        tokens: Sequence[str], rows: Iterable[records.Row], held: dict[str, Any],
    ) -> Claims:  # fmt: skip
        """The Claims of a lease statement's rows (each with its job's params)."""
        leased = {r["id"]: r for r in rows}
        return Claims(
            [
                records.claim_from_row(
                    leased[execution_id],
                    loads=self._loads,
                    token=token,
                    source=source.value,
                    region=request.region.name,
                    params=self._loads(leased[execution_id]["job_params"]),
                    lease_expires_at=request.expires,
                    reserved_tokens=reserved,
                    deadline_at=leased[execution_id]["job_deadline_at"],
                )
                for (execution_id, source, reserved), token in zip(picked, tokens, strict=True)
            ],
            held,
        )

    def _costs(self, db: DB, ids: list[int]) -> dict[int, int]:
        """Each execution's estimated tokens: prompt characters / 4 + its max_tokens."""
        rows: Iterable[Any] = (
            db.execute(self.queries["claim_costs"], {"ids": self._list(ids)}) if ids else []
        )
        estimate, loads = pacing.estimate_tokens, self._loads
        return {r["id"]: estimate(r["chars"], loads(r["params"]).get("max_tokens")) for r in rows}

    def update_pace(
        self, region: str, model: str, max_limit: int, change: pacing.PaceChange
    ) -> Pace:
        with self._transaction(write=True) as db:
            pace = self._pace_for_update(db, region, model, max_limit)
            after = change(pace)
            if after != pace:
                db.execute(self.queries["pace_put"], records.pace_args(after, self._dumps))
        return after

    def paces(self, regions: Sequence[str]) -> list[Pace]:
        with self._transaction() as db:
            return [
                records.pace_from_row(r, self._loads)
                for name in regions
                for r in db.execute(self.queries["paces_of_region"], {"region": name})
            ]

    def expire_deadlines(self, now: float, job_ids: Sequence[str] | None = None) -> int:
        with self._transaction(write=True) as db:
            if job_ids is None:
                job_ids = [r["id"] for r in db.execute(self.queries["expire_jobs"], {"now": now})]
            if not job_ids:
                return 0
            args = {"now": now, "job_ids": self._list(job_ids), "message": rules.DEADLINE_MESSAGE}
            ended = db.execute(self.queries["expire_executions"], args).rowcount
        self._logger.warning("job deadline passed", extra={"jobs": job_ids[:20], "ended": ended})
        return ended

    def divert_queued(self, region: str, now: float, model: str | None = None) -> int:
        with self._transaction(write=True) as db:
            args = {"region": region, "now": now, "model": model}
            moved = db.execute(self.queries["divert_queued"], args).rowcount
            if moved:
                self._announce(db, now)
        if moved:
            self._logger.info("diverted %d queued executions away from region %s", moved, region)
        return moved

    # -- regions --------------------------------------------------------------
    def set_circuit(self, region: str, state: str, open_until: float | None) -> None:
        records.check_circuit_state(state)
        with self._transaction(write=True) as db:
            args = {"region": region, "state": state, "open_until": open_until}
            db.execute(self.queries["set_circuit"], args)

    def queue_stats(self, now: float, regions: Sequence[RegionSpec]) -> QueueStats:
        names = [spec.name for spec in regions]
        with self._transaction() as db:
            totals = db.execute(self.queries["queue_totals"]).fetchone()
            rows = self._queue_regions(db, names)
            paces = {
                name: [
                    records.pace_from_row(r, self._loads)
                    for r in db.execute(self.queries["paces_of_region"], {"region": name})
                ]
                for name in names
            }
        queues = [
            RegionQueue(
                region=name,
                queued=row["queued"],
                retry_wait=row["retry_wait"],
                in_flight=row["in_flight"],
                circuit=row["circuit"],
                circuit_open_until=row["open_until"],
                paces=paces[name],
            )
            for name, row in zip(names, rows, strict=True)
        ]
        return QueueStats(global_retry=totals["global_retry"], regions=queues, dead=totals["dead"])


@dataclass(frozen=True)
class ClaimState:
    """What a claim read before picking (``SQLStore._claim_reads``), in its transaction."""

    leased: dict[str, int]  # the region's leases per model
    paces: dict[str, Pace]  # every model's pace, locked
    retries_due: bool  # False: claim steps 1 and 2 would find nothing
    tenants: list[str]  # the queued_tenants answer
    leased_by_tenant: dict[str, int]

    @property
    def total_leased(self) -> int:
        return sum(self.leased.values())


class _SQLQueues(Generic[DB]):
    """rules.ClaimQueues on a SQL store's named queries, inside one claim's transaction;
    the answers that do not depend on the group's models come from the claim's reads."""

    def __init__(self, store: SQLStore[DB], db: DB, args: dict[str, Any], state: ClaimState):
        self.store, self.db, self.args, self.state = store, db, args, state

    def _ids(self, name: str, **extra: Any) -> list[int]:
        return [r["id"] for r in self.db.execute(self.store.queries[name], {**self.args, **extra})]

    def global_retries(self, n: int) -> list[int]:
        return self._ids("global_retries", n=n) if self.state.retries_due else []

    def own_retries(self, taken: list[int], n: int) -> list[int]:
        if not self.state.retries_due:
            return []
        return self.store._own_retries(self.db, self.args, taken, n)

    def queued_tenants(self) -> list[str]:
        return list(self.state.tenants)

    def leased_by_tenant(self) -> dict[str, int]:
        return dict(self.state.leased_by_tenant)

    def tenant_new_work(self, tenant: str, n: int) -> list[int]:
        return self._ids("tenant_new_work", tenant=tenant, n=n)

    def stale_queued(self, n: int) -> list[int]:
        if self.args.get("stale_before") is None:  # schedule-to-start is off
            return []
        return self._ids("stale_queued", n=n)
