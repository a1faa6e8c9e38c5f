"""What the SQLite and PostgreSQL stores share: migrations on disk, job expansion,
the tenant round-robin, and mapping rows to the interface's dataclasses.

Kept apart from both implementations so that the two stay about their SQL
dialect and locking only, and so the claim order is written once.
"""

from __future__ import annotations

import logging
import secrets
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, TypeVar

from executor_service.dispatcher.store.base import (
    Attempt,
    Claim,
    Execution,
    Failover,
    Job,
    NewJob,
    State,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")
Row = Mapping[str, Any]
Loads = Callable[[Any], Any]

# Which queue a claim came from; release() uses it to put the execution back.
SOURCE_GLOBAL_RETRY = "global_retry"
SOURCE_OWN_RETRY = "own_retry"
SOURCE_NEW = "new"

CIRCUIT_STATES = frozenset({"closed", "open", "half_open"})

LEASE_EXPIRED_ERROR: dict[str, Any] = {
    "code": "lease_expired",
    "message": "the lease expired before its worker reported a result "
    "(the worker crashed, hung or lost the store)",
}

# Columns written for each new execution, in this order, by both stores.
NEW_EXECUTION_COLUMNS = (
    "job_id",
    "tenant",
    "question_index",
    "question",
    "model",
    "requested_region",
    "state",
    "attempts",
    "max_attempts",
    "failover",
    "priority",
    "job_created_at",
    "created_at",
)


@dataclass(frozen=True)
class Migration:
    """One versioned SQL file: ``NNNN_name.sql``."""

    version: int
    name: str
    sql: str


def load_migrations(dialect: str) -> list[Migration]:
    """The migrations shipped in ``sql/<dialect>/``, in version order."""
    folder = resources.files("executor_service.dispatcher.store").joinpath("sql", dialect)
    found: list[Migration] = []
    for entry in folder.iterdir():
        if not entry.name.endswith(".sql"):
            continue
        prefix, _, rest = entry.name.partition("_")
        if not prefix.isdigit():
            raise ValueError(f"migration file {entry.name!r} must start with a version number")
        found.append(Migration(int(prefix), rest.removesuffix(".sql"), entry.read_text("utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise ValueError(f"duplicate migration versions in sql/{dialect}: {versions}")
    return found


def load_queries(dialect: str) -> dict[str, str]:
    """The named queries of ``sql/queries_<dialect>.sql``: blocks that each start
    with a ``-- name: <name>`` line, as procrastinate keeps its SQL."""
    text = (
        resources.files("executor_service.dispatcher.store")
        .joinpath("sql", f"queries_{dialect}.sql")
        .read_text("utf-8")
    )
    queries: dict[str, str] = {}
    name: str | None = None
    lines: list[str] = []
    for line in [*text.splitlines(), "-- name: <end>"]:
        if line.startswith("-- name:"):
            if name is not None:
                queries[name] = "\n".join(lines).strip().removesuffix(";")
            name, lines = line.removeprefix("-- name:").strip(), []
        elif name is not None:
            lines.append(line)
    return queries


def new_job_id() -> str:
    """A uuid4 in hex, as the job id (random, so ids reveal nothing about volume)."""
    return uuid.uuid4().hex


def new_token() -> str:
    """A fresh lease token: unguessable, so only the claiming worker can write."""
    return secrets.token_hex(16)


def expand(job: NewJob) -> Iterator[tuple[int, str, str, str]]:
    """(question_index, question, model, region) for every execution of the job,
    in question, model, region order (the order ids are assigned in)."""
    for index, question in enumerate(job.questions):
        for model in job.models:
            for region in job.regions_by_model.get(model, []):
                yield index, question, model, region


def execution_rows(job: NewJob, job_id: str, now: float) -> Iterator[tuple[Any, ...]]:
    """Rows in NEW_EXECUTION_COLUMNS order for every execution of the job."""
    failover = Failover(job.failover).value
    for index, question, model, region in expand(job):
        yield (
            job_id,
            job.tenant,
            index,
            question,
            model,
            region,
            State.QUEUED.value,
            0,
            job.max_attempts,
            failover,
            job.priority,
            now,
            now,
        )


def count_executions(job: NewJob) -> int:
    """How many executions the job expands into."""
    per_question = sum(len(job.regions_by_model.get(model, [])) for model in job.models)
    return per_question * len(job.questions)


def order_tenants(tenants: Sequence[str], leased: Mapping[str, int]) -> list[str]:
    """Tenants with fewer executions leased in the region first, then by name,
    so a tenant with a big backlog cannot starve a newcomer."""
    return sorted(tenants, key=lambda t: (leased.get(t, 0), t))


def round_robin(
    tenants: Sequence[str], fetch: Callable[[str, int], list[T]], per_tenant: int, limit: int
) -> list[T]:
    """Interleave each tenant's next items (tenant1 #1, tenant2 #1, ..., tenant1 #2, ...)
    and return the first ``limit``. ``fetch(tenant, n)`` returns up to n of the
    tenant's items in its own order. Stops asking tenants once the first round
    alone fills ``limit``: later tenants could not make the cut."""
    if limit <= 0 or per_tenant <= 0:
        return []
    batches: list[list[T]] = []
    for tenant in tenants:
        if len(batches) >= limit:
            break
        batch = fetch(tenant, min(per_tenant, limit))
        if batch:
            batches.append(batch)
    out: list[T] = []
    for rank in range(max((len(b) for b in batches), default=0)):
        out.extend(b[rank] for b in batches if rank < len(b))
    return out[:limit]


def job_from_row(row: Row, loads: Loads) -> Job:
    """A jobs row as a Job."""
    return Job(
        id=row["id"],
        tenant=row["tenant"],
        created_at=row["created_at"],
        failover=Failover(row["failover"]),
        max_attempts=row["max_attempts"],
        priority=row["priority"],
        questions=loads(row["questions"]),
        models=loads(row["models"]),
        regions_by_model=loads(row["regions_by_model"]),
        params=loads(row["params"]),
        idempotency_key=row["idempotency_key"],
        cancelled=bool(row["cancelled"]),
        total=row["total"],
    )


def attempt_from_row(row: Row, loads: Loads) -> Attempt:
    """An attempts row as an Attempt."""
    return Attempt(
        number=row["number"],
        region=row["region"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        ok=bool(row["ok"]),
        error=loads(row["error"]),
    )


def execution_from_row(row: Row, loads: Loads, attempt_log: list[Attempt]) -> Execution:
    """An executions row (plus its attempts) as an Execution."""
    return Execution(
        id=row["id"],
        job_id=row["job_id"],
        tenant=row["tenant"],
        question_index=row["question_index"],
        question=row["question"],
        model=row["model"],
        requested_region=row["requested_region"],
        executed_region=row["executed_region"],
        state=State(row["state"]),
        attempts=row["attempts"],
        due_at=row["due_at"],
        last_error=loads(row["last_error"]),
        output=row["output"],
        result=loads(row["result"]),
        created_at=row["created_at"],
        finished_at=row["finished_at"],
        attempt_log=attempt_log,
    )


def check_circuit_state(state: str) -> None:
    """Reject a circuit state the rest of the system would not understand."""
    if state not in CIRCUIT_STATES:
        raise ValueError(f"circuit state must be one of {sorted(CIRCUIT_STATES)}, not {state!r}")


def claim_from_row(
    row: Row,
    *,
    token: str,
    source: str,
    region: str,
    params: dict[str, Any],
    lease_expires_at: float,
) -> Claim:
    """A freshly leased executions row as the Claim handed to a worker."""
    return Claim(
        execution_id=row["id"],
        token=token,
        job_id=row["job_id"],
        tenant=row["tenant"],
        question_index=row["question_index"],
        question=row["question"],
        model=row["model"],
        requested_region=row["requested_region"],
        region=region,
        attempt=row["attempts"],
        max_attempts=row["max_attempts"],
        failover=Failover(row["failover"]),
        params=params,
        lease_expires_at=lease_expires_at,
        source=source,
    )


def output_of(result: Mapping[str, Any]) -> str | None:
    """The answer text of an executor's 200 body (None if it has none)."""
    output = result.get("output")
    return None if output is None else str(output)
