"""The dispatcher's HTTP API: submit jobs, follow them, read results, cancel, see the queues.

    POST /jobs                  submit (Idempotency-Key: same key and body -> the same job)
    GET  /jobs/<id>             counts per region and state, progress, ETA
    GET  /jobs/<id>/results     executions with their attempts: JSON pages, or the whole
                                job as CSV or JSONL (exports.py)
    POST /jobs/<id>/cancel      cancel what has not started
    GET  /queue                 global retry queue; per region queues, in flight, circuit
    GET  /metrics               Prometheus (the region workers' counters too)

The workbench's routes (GET /jobs, retry, compare) are in ``workbench.py``, its pages
(/jobs/<id>/view, /jobs/view) in ``pages.py``; ``init_app`` registers them.

A tenant (from the API key) sees only its own jobs: another tenant's job id is
404, exactly like an id that does not exist. The API never calls executors:
the region workers run in their own process (``executor-service dispatcher``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flask import Flask, Response, current_app, g, request, stream_with_context

from ..errors import APIError, Conflict, NotFound, error_response
from ..jsonbody import Blueprint
from . import cursors, exports, metrics, progress, results
from .config import DispatcherSettings
from .jobs import JobLimits, build_job
from .pacing_view import blocked, pace_view, waiting_view
from .regions import Regions
from .scheduler import Clock
from .schemas import (
    CancelSchema,
    JobRequestSchema,
    JobSchema,
    QueueSchema,
    ResultsQuerySchema,
    ResultsSchema,
)
from .store.base import (
    IdempotencyConflict,
    Job,
    Store,
    StoreError,
)

logger = logging.getLogger(__name__)

blp = Blueprint("dispatcher", __name__, description="Jobs of questions x models x regions.")

# Executions per page of GET /jobs/<id>/results by default: a page of full answers and
# attempt logs stays a few MB.
RESULTS_PAGE = 1000


class StoreUnavailable(APIError):
    """The job store is unavailable; retry shortly."""

    status, code = 503, "store_unavailable"


@dataclass
class DispatcherState:
    """What the routes need, kept in ``app.extensions["dispatcher"]``."""

    settings: DispatcherSettings
    store: Store
    regions: Regions
    limits: JobLimits
    clock: Clock


def state() -> DispatcherState:
    return current_app.extensions["dispatcher"]


def _owned_job(job_id: str) -> Job:
    job = state().store.get_job(g.tenant, job_id)
    if job is None:
        raise NotFound(f"no job {job_id!r}", details={"job_id": job_id})
    return job


# -- views --------------------------------------------------------------------
def job_view(
    job: Job,
    counts: Mapping[str, Mapping[str, int]],
    now: float,
    waiting: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """The job with its counts, progress (succeeded, dead, cancelled and in progress
    apart; see progress.py) per region and in all, and ETAs from the rate so far. With
    ``waiting`` (``job_waiting``): why its work waits, and no ETA (``eta_s`` null,
    ``eta_unknown`` why) for a region it cannot finish without, nor for the job."""
    states: dict[str, int] = {}
    for per_state in counts.values():
        for name, n in per_state.items():
            states[name] = states.get(name, 0) + n
    total = job.total
    tallied = progress.tally(states, total)
    done = tallied["done"]
    elapsed = max(now - job.created_at, 1e-6)
    if done >= total:
        phase = "cancelled" if job.cancelled else "finished"
    elif job.cancelled:
        phase = "cancelling"
    elif states.get("queued", 0) == total:
        phase = "queued"
    else:
        phase = "running"
    region_order: list[str] = []
    for names in job.regions_by_model.values():
        region_order += [r for r in names if r not in region_order]
    eta = progress.eta_s(done, total, elapsed)
    regions = progress.region_progress(counts, elapsed, region_order)
    stuck = blocked(waiting or {}, job.failover.value)
    for r in regions:
        why = stuck.get(r["region"]) if r["in_progress"] else None
        if why:
            r["eta_s"] = None  # a number "as if healthy" would be a lie
        r["eta_unknown"] = why or (progress.NO_RATE_YET if r["eta_s"] is None else None)
    waits = [r["eta_unknown"] for r in regions if r["region"] in stuck and r["in_progress"]]
    if waits:
        eta = None
    eta_unknown = "; ".join(waits) or (progress.NO_RATE_YET if eta is None else None)
    view: dict[str, Any] = {
        "id": job.id,
        "tenant": job.tenant,
        "name": job.name,
        "tags": job.tags,
        "state": phase,
        "created_at": job.created_at,
        "failover": job.failover.value,
        "max_attempts": job.max_attempts,
        "priority": job.priority,
        "models": job.models,
        "regions_by_model": job.regions_by_model,
        "questions": len(job.questions),
        "samples": job.samples,
        "params": job.params,
        "idempotency_key": job.idempotency_key,
        "cancelled": job.cancelled,
        "total": total,
        "counts": {region: dict(per_state) for region, per_state in counts.items()},
        "states": states,
        "progress": tallied,
        "regions": regions,
        "eta_s": eta,
        "eta_unknown": eta_unknown,
        "view_url": f"/jobs/{job.id}/view",
        "deadline_at": job.deadline_at,
    }
    if waiting is not None:
        view["waiting"] = waiting
    return view


def job_waiting(st: DispatcherState, job: Job, counts: Mapping[str, Mapping[str, int]]) -> Any:
    """The job's ``waiting`` (pacing_view.waiting_view) from the store's paces, now."""
    paces = st.store.paces(list(counts))
    return waiting_view(counts, job.models, paces, st.regions.by_name, st.clock())


def _export_format(fmt: str | None) -> str:
    """json, csv or jsonl: ?format= first, else the Accept header."""
    if fmt is not None:
        return fmt
    types = {"application/json": "json", "text/csv": "csv", "application/x-ndjson": "jsonl"}
    best = request.accept_mimetypes.best_match(list(types))
    return types.get(best or "application/json", "json")


# -- routes -------------------------------------------------------------------
@blp.route("/jobs", methods=["POST"])
@blp.arguments(JobRequestSchema())
@blp.response(201, JobSchema, description="created")
@blp.alt_response(200, schema=JobSchema, description="the job this Idempotency-Key made")
@blp.alt_response(409, description="conflict: the Idempotency-Key was used with another body")
@blp.alt_response(422, description="validation_error: details name the fields")
def create_job(body: dict[str, Any]) -> tuple[dict[str, Any], int, dict[str, str]]:
    """Submit a job: every question to every model in every requested region."""
    st = state()
    new = build_job(body, g.tenant, st.regions, st.limits, request.headers.get("Idempotency-Key"))
    now = st.clock()
    try:
        job, created = st.store.create_job(new, now)
    except IdempotencyConflict:
        raise Conflict(
            "this Idempotency-Key was used for a different job request",
            details={"idempotency_key": new.idempotency_key},
        ) from None
    logger.info(
        "job submitted",
        extra={"job_id": job.id, "tenant": job.tenant, "total": job.total, "new_job": created},
    )
    view = job_view(job, st.store.job_counts(job.id), now)
    return view, 201 if created else 200, {"Location": f"/jobs/{job.id}"}


@blp.route("/jobs/<job_id>", methods=["GET"])
@blp.response(200, JobSchema)
@blp.alt_response(404, description="not_found (also another tenant's job)")
def get_job(job_id: str) -> dict[str, Any]:
    """A job's progress: counts per requested region and state, and an ETA."""
    st = state()
    job = _owned_job(job_id)
    counts = st.store.job_counts(job.id)
    now = st.clock()
    return job_view(job, counts, now, job_waiting(st, job, counts))


@blp.route("/jobs/<job_id>/results", methods=["GET"])
@blp.arguments(ResultsQuerySchema, location="query")
@blp.response(
    200,
    ResultsSchema,
    description="JSON, one page (next_cursor); the whole job as CSV with ?format=csv or "
    "Accept: text/csv, as JSONL with ?format=jsonl or Accept: application/x-ndjson",
)
@blp.alt_response(404, description="not_found")
def get_results(query: dict[str, Any], job_id: str) -> Any:
    """Every execution: question, messages, model, sample, requested and executed region,
    state, each attempt's error and timing, and the answer."""
    st = state()
    job = _owned_job(job_id)
    fmt = _export_format(query.get("format"))
    counts = st.store.job_counts(job.id)
    waiting = job_waiting(st, job, counts)
    if fmt in ("csv", "jsonl"):
        views = (view for _, view in results.views(st.store, job, waiting))
        write = exports.csv_chunks if fmt == "csv" else exports.jsonl_lines
        chunks = write(views, job.id)
        mimetype = "text/csv" if fmt == "csv" else "application/x-ndjson"
        response = Response(stream_with_context(chunks), mimetype=f"{mimetype}; charset=utf-8")
        response.headers["Content-Disposition"] = f'attachment; filename="job-{job.id}.{fmt}"'
        return response
    after = results.cursor_key(query["cursor"]) if query.get("cursor") else None
    limit = query.get("limit") or RESULTS_PAGE
    # One more than the page: whether there is a next page, without a count.
    page = list(results.views(st.store, job, waiting, after, limit + 1))
    more, page = len(page) > limit, page[:limit]
    body = {
        "job_id": job.id,
        "state": job_view(job, counts, st.clock())["state"],
        "total": job.total,
        "executions": [view for _, view in page],
        "next_cursor": cursors.encode(page[-1][0]) if more else None,
    }
    # The views are ResultsSchema's shape already (a unit test holds them to it): dumping
    # a page of 1,000 executions through marshmallow took 4/5 of the page's time, with
    # the worker's event loop held all along.
    return current_app.json.response(body)


@blp.route("/jobs/<job_id>/cancel", methods=["POST"])
@blp.response(200, CancelSchema)
@blp.alt_response(404, description="not_found")
def cancel_job(job_id: str) -> dict[str, Any]:
    """Cancel the executions not yet started; calls in flight finish and keep their result."""
    st = state()
    job = _owned_job(job_id)
    cancelled = st.store.cancel_job(g.tenant, job.id, st.clock())
    job = _owned_job(job_id)
    logger.info("job cancel", extra={"job_id": job.id, "cancelled": cancelled})
    phase = job_view(job, st.store.job_counts(job.id), st.clock())["state"]
    return {"job_id": job.id, "cancelled": cancelled, "state": phase}


def queue_view(st: DispatcherState) -> dict[str, Any]:
    now = st.clock()
    stats = st.store.queue_stats(now, st.regions.specs())
    return {
        "global_retry": stats.global_retry,
        "dead": stats.dead,
        "regions": [
            {
                "region": q.region,
                "concurrency": st.regions[q.region].concurrency if q.region in st.regions else 0,
                "queued": q.queued,
                "retry_wait": q.retry_wait,
                "in_flight": q.in_flight,
                "circuit": q.circuit,
                "circuit_open_until": q.circuit_open_until,
                "models": [pace_view(p, st.regions.by_name.get(q.region), now) for p in q.paces],
            }
            for q in stats.regions
        ],
    }


@blp.route("/queue", methods=["GET"])
@blp.response(200, QueueSchema)
def get_queue() -> dict[str, Any]:
    """The queues across all tenants: global retry queue, and per region its queue, its
    retries, its calls in flight and its circuit."""
    return queue_view(state())


def _refresh_queue_gauges() -> None:
    """Before ``/metrics`` answers, read the queue depths from the store."""
    if request.path != "/metrics":
        return
    try:
        view = queue_view(state())
    except StoreError:
        logger.exception("queue stats for /metrics failed")
        return
    metrics.GLOBAL_RETRY_QUEUE.set(view["global_retry"])
    metrics.DEAD_EXECUTIONS.set(view["dead"])
    for q in view["regions"]:
        for name in ("queued", "retry_wait", "in_flight"):
            metrics.QUEUE_DEPTH.labels(q["region"], name).set(q[name])
        metrics.CIRCUIT_OPEN.labels(q["region"]).set(0 if q["circuit"] == "closed" else 1)
        for m in q["models"]:
            labels = (q["region"], m["model"])
            metrics.NOT_BEFORE.labels(*labels).set(m["not_before"] or 0.0)
            metrics.EFFECTIVE_CONCURRENCY.labels(*labels).set(m["concurrency"])
            metrics.MAX_CONCURRENCY.labels(*labels).set(m["max_concurrency"])
            budget = m["budget"] or {}
            for unit, key in (("requests", "requests_left"), ("tokens", "tokens_left")):
                if budget.get(key) is not None:
                    metrics.BUDGET_LEVEL.labels(*labels, unit).set(budget[key])


def init_app(
    app: Flask, settings: DispatcherSettings, api: Any, store: Store, regions: Regions, clock: Clock
) -> None:
    app.extensions["dispatcher"] = DispatcherState(
        settings=settings,
        store=store,
        regions=regions,
        limits=JobLimits.from_settings(settings),
        clock=clock,
    )
    app.before_request(_refresh_queue_gauges)

    @app.errorhandler(StoreError)
    def _store_error(exc: StoreError) -> Response:
        logger.error("store error: %s", exc)
        return error_response(StoreUnavailable(headers={"Retry-After": "1"}))

    api.register_blueprint(blp)
    from . import pages, workbench

    workbench.init_app(api)
    pages.init_app(app)
    from . import openai_batch_api  # the OpenAI Batch API (/v1/files, /v1/batches)

    openai_batch_api.init_app(app, api)


def create_dispatcher_app(
    test_config: Mapping[str, Any] | None = None,
    settings: DispatcherSettings | None = None,
    store: Store | None = None,
    regions: Regions | None = None,
    clock: Clock = time.time,
) -> Flask:
    """The dispatcher API: settings from the environment (``ES_*``), the regions file,
    the store at ``ES_DATABASE_URL`` (migrated on open) unless one is passed in."""
    from ..app import base_app
    from .store import open_store

    settings = settings or DispatcherSettings.from_env()
    regions = regions or Regions.load(settings.regions_file)
    app, api = base_app(__name__, settings, test_config, "executor-service dispatcher")
    if store is None:
        store = open_store(settings.database_url)
    init_app(app, settings, api, store, regions, clock)
    return app
