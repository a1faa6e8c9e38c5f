"""A job's results as the API reads them: execution views, each still waiting with its
reason, read from the store by key (``Store.executions(after=...)``) a chunk at a time,
for the JSON pages and the streamed CSV/JSONL exports of ``GET /jobs/<id>/results``.

Memory stays one chunk whatever the job's size, and the worker's other requests
(``/health`` above all) run between chunks and every few executions (``cooperate``).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from . import cursors, pacing_view
from .store.base import Execution, ExecutionKey, Job, Store

# Executions per store read of a page or an export: one read holds the worker (and, under
# gevent, its event loop) for a few ms, and memory for a few hundred answers.
READ_CHUNK = 200
# Other requests (/health) get the worker every this many executions viewed (a few ms).
COOPERATE_EVERY = 50


def execution_view(e: Execution, waiting_reason: str | None = None) -> dict[str, Any]:
    """One execution as the API shows it; ``waiting_reason``: why it has not run yet
    (``pacing_view.waiting_reason``), when the caller knows."""
    result = e.result or {}
    return {
        "id": e.id,
        "question_index": e.question_index,
        "question": e.question,
        "messages": e.messages,
        "sample": e.sample,
        "model": e.model,
        "requested_region": e.requested_region,
        "executed_region": e.executed_region,
        "state": e.state.value,
        # this round's attempts (a retry of the job starts a new round); the log has all
        "attempts": e.attempts - e.attempt_base,
        "attempts_total": e.attempts,
        "deferrals": e.deferrals,
        "hedges": e.hedges,
        "attempt_log": [
            {
                "number": a.number,
                "region": a.region,
                "started_at": a.started_at,
                "finished_at": a.finished_at,
                "duration_ms": None
                if a.finished_at is None or a.started_at is None
                else round((a.finished_at - a.started_at) * 1000, 3),
                "ok": a.ok,
                "error": a.error,
            }
            for a in e.attempt_log
        ],
        "last_error": e.last_error,
        "output": e.output,
        "finish_reason": result.get("finish_reason"),
        "usage": result.get("usage"),
        "timing": result.get("timing"),
        "replica": result.get("replica"),
        "reused_from": result.get("reused_from"),
        "created_at": e.created_at,
        "finished_at": e.finished_at,
        "waiting_reason": waiting_reason,
    }


def result_views(
    executions: Iterable[Execution], job: Job, waiting: Mapping[str, Mapping[str, Any]]
) -> Iterator[dict[str, Any]]:
    """The views of a job's executions, each still waiting with its reason."""
    failover = job.failover.value
    for e in executions:
        why = pacing_view.waiting_reason
        yield execution_view(e, why(waiting, failover, e.state.value, e.requested_region, e.model))


def cooperate() -> None:
    """Let the worker's other requests run (``/health`` first of all). Under gevent (the
    API's default worker) a greenlet streaming to a client that reads as fast as it
    writes never blocks on its socket, so it held the event loop from the first page
    to the last: four big exports blocked /health for their whole length. There, wait
    until the loop has polled its sockets and run what was ready (``gevent.idle``;
    ``sleep(0)`` runs only greenlets already switched to, and /health's request had
    not been read yet). Under gthread the interpreter switches threads by itself."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None and monkey.is_module_patched("socket"):
        import gevent

        gevent.idle()


def views(
    store: Store,
    job: Job,
    waiting: Mapping[str, Mapping[str, Any]],
    after: ExecutionKey | None = None,
    limit: int | None = None,
) -> Iterator[tuple[ExecutionKey, dict[str, Any]]]:
    """(key, view) of the job's executions after ``after`` (``limit`` of them, or all),
    read from the store ``READ_CHUNK`` at a time by key, so memory stays one chunk
    whatever the job's size; other requests get the worker between chunks and every
    ``COOPERATE_EVERY`` executions."""
    left = limit
    while left is None or left > 0:
        cooperate()
        want = READ_CHUNK if left is None else min(READ_CHUNK, left)
        chunk = store.executions(job.id, with_attempts=True, after=after, limit=want)
        views = result_views(chunk, job, waiting)
        for i, (e, view) in enumerate(zip(chunk, views, strict=True), 1):
            yield e.key, view
            if i % COOPERATE_EVERY == 0:
                cooperate()
        if len(chunk) < want:
            return
        after = chunk[-1].key
        left = None if left is None else left - len(chunk)


def cursor_key(cursor: str) -> ExecutionKey:
    """A results cursor (``next_cursor``) back to the key of the last execution of the
    previous page."""

    def parse(values: list[Any]) -> ExecutionKey:
        question, model, region, execution = values
        if not isinstance(model, str) or not isinstance(region, str):
            raise TypeError("model and region are strings")
        return int(question), model, region, int(execution)

    return cursors.decode(cursor, parse)
