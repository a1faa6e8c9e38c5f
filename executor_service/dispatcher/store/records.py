"""Building and mapping the records every store keeps: job ids and lease tokens, a
job's expansion into executions, and database rows as the dataclasses of ``models.py``.
Shared by the SQL stores and the memory store, so the three agree on them.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from typing import Any, NamedTuple

from executor_service.dispatcher.pacing import Pace
from executor_service.dispatcher.store.models import (
    Attempt,
    Claim,
    Execution,
    Failover,
    Job,
    NewJob,
    State,
)

Row = Mapping[str, Any]
Loads = Callable[[Any], Any]

CIRCUIT_STATES = frozenset({"closed", "open", "half_open"})

# Columns written for each new execution, in this order, by the SQL stores.
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
    "sample",
    "messages",
)


def new_job_id() -> str:
    """A uuid4 in hex, as the job id (random, so ids reveal nothing about volume)."""
    return uuid.uuid4().hex


def new_token() -> str:
    """A fresh lease token: unguessable, so only the claiming worker can write."""
    return secrets.token_hex(16)


class Expanded(NamedTuple):
    """One execution of a new job."""

    question_index: int
    question: str
    model: str
    region: str
    sample: int
    messages: list[dict[str, str]] | None


def expand(job: NewJob) -> Iterator[Expanded]:
    """Every execution of the job, in question, model, region, sample order (the order
    ids are assigned in)."""
    for index, question in enumerate(job.questions):
        messages = job.messages[index] if index < len(job.messages) else None
        for model in job.models:
            for region in job.regions_by_model.get(model, []):
                for sample in range(job.samples):
                    yield Expanded(index, question, model, region, sample, messages)


def execution_rows(job: NewJob, job_id: str, now: float, dumps: Loads) -> Iterator[tuple[Any, ...]]:
    """Rows in NEW_EXECUTION_COLUMNS order for every execution of the job; ``dumps``
    makes the JSON parameter of the messages column."""
    failover = Failover(job.failover).value
    for index, question, model, region, sample, messages in expand(job):
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
            sample,
            None if messages is None else dumps(messages),
        )


def count_executions(job: NewJob) -> int:
    """How many executions the job expands into."""
    per_question = sum(len(job.regions_by_model.get(model, [])) for model in job.models)
    return per_question * len(job.questions) * job.samples


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
        deadline_at=row["deadline_at"],
        samples=row["samples"],
        name=row["name"],
        tags=loads(row["tags"]),
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
        deferrals=row["deferrals"],
        sample=row["sample"],
        messages=loads(row["messages"]),
        attempt_base=row["attempt_base"],
        hedges=row.get("hedges", 0),
    )


def claim_from_row(
    row: Row,
    *,
    loads: Loads,
    token: str,
    source: str,
    region: str,
    params: dict[str, Any],
    lease_expires_at: float,
    reserved_tokens: int = 0,
    deadline_at: float | None = None,
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
        deferrals=row["deferrals"],
        reserved_tokens=reserved_tokens,
        deadline_at=deadline_at,
        sample=row["sample"],
        messages=loads(row["messages"]),
        hedges=row.get("hedges", 0),
    )


def as_hedge(claim: Claim, hedge_of: str) -> Claim:
    """A hedge's Claim: its token is its seat's, ``hedge_of`` the lease it races."""
    return replace(claim, hedge_of=hedge_of)


def output_of(result: Mapping[str, Any]) -> str | None:
    """The answer text of an executor's 200 body (None if it has none)."""
    output = result.get("output")
    return None if output is None else str(output)


def check_circuit_state(state: str) -> None:
    """Reject a circuit state the rest of the system would not understand."""
    if state not in CIRCUIT_STATES:
        raise ValueError(f"circuit state must be one of {sorted(CIRCUIT_STATES)}, not {state!r}")


def pace_from_row(row: Mapping[str, Any], loads: Loads) -> Pace:
    """A paces row as a pacing.Pace (its ``lim`` column is the ``limit`` field)."""
    return Pace(
        region=row["region"],
        model=row["model"],
        limit=int(row["lim"]),
        max_limit=int(row["max_limit"]),
        not_before=row["not_before"],
        success_run=int(row["success_run"]),
        decreased_at=row["decreased_at"],
        requests=row["requests"],
        tokens=row["tokens"],
        level_at=row["level_at"],
        deferrals=int(row["deferrals"]),
        circuit=row["circuit"],
        circuit_open_until=row["circuit_open_until"],
        circuit_since=row["circuit_since"],
        circuit_error=loads(row["circuit_error"]),
    )


def pace_args(pace: Pace, dumps: Loads) -> dict[str, Any]:
    """The named parameters of pace_put (``dumps``: the dialect's JSON parameter)."""
    return {**vars(pace), "circuit_error": dumps(pace.circuit_error)}
