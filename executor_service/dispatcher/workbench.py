"""The researcher's workbench routes: list jobs, re-run failed cells, compare regions.

    GET  /jobs                  the tenant's jobs, newest first (cursor, state, name)
    POST /jobs/<id>/retry       re-queue dead (and optionally cancelled) executions
    GET  /jobs/<id>/compare     per model a grid question x region, how the regions'
                                answers differ, refusals, usage and cost (compare.py)

Kept beside ``api.py`` (submit, follow, results, cancel) so each module stays about
one thing; both share ``api.state()`` and its tenant check.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import g
from marshmallow import Schema, fields, validate

from ..errors import ValidationFailed
from ..jsonbody import Blueprint
from . import compare, cursors
from .api import _owned_job, job_view, state
from .results import execution_view
from .schemas import JobSchema, QuestionSchema
from .store.base import JobQuery, RetryRequest
from .store.models import JOB_PHASES

logger = logging.getLogger(__name__)

blp = Blueprint("workbench_api", __name__, description="Compare, list and re-run jobs.")


class UsageTotalSchema(Schema):
    executions = fields.Integer(metadata={"description": "answered calls counted"})
    prompt_tokens = fields.Integer()
    completion_tokens = fields.Integer()
    cost_usd = fields.Float(
        allow_none=True,
        metadata={"description": "from the regions file's prices; null unless all are priced"},
    )


class UsageSchema(Schema):
    job = fields.Nested(UsageTotalSchema)
    by_region = fields.Dict(keys=fields.String(), values=fields.Nested(UsageTotalSchema))
    by_model = fields.Dict(keys=fields.String(), values=fields.Nested(UsageTotalSchema))


class CompareCellSchema(Schema):
    execution_id = fields.Integer()
    state = fields.String()
    executed_region = fields.String(allow_none=True)
    attempts = fields.Integer()
    output = fields.String(allow_none=True)
    finish_reason = fields.String(allow_none=True)
    error = fields.Dict(allow_none=True)
    refusal = fields.String(
        allow_none=True, metadata={"description": "why this is a refusal; null if it is not"}
    )
    segments = fields.List(
        fields.Dict(),
        allow_none=True,
        metadata={"description": "the answer as runs {text, changed}: changed words differ"},
    )


class CompareRowSchema(Schema):
    question_index = fields.Integer()
    sample = fields.Integer()
    question = fields.String()
    differs = fields.Boolean(
        metadata={"description": "the regions' answers differ (or some refused)"}
    )
    complete = fields.Boolean(
        metadata={"description": "every region answered or refused (none dead or running)"}
    )
    exact_match = fields.Boolean(metadata={"description": "every region gave the same answer"})
    similarity = fields.Float(
        allow_none=True, metadata={"description": "0..1, the least alike pair of regions"}
    )
    refusals = fields.List(fields.String(), metadata={"description": "regions that refused"})
    answered = fields.Integer()
    cells = fields.Dict(keys=fields.String(), values=fields.Nested(CompareCellSchema))


class CompareModelSchema(Schema):
    model = fields.String()
    regions = fields.List(fields.String())
    rows = fields.List(fields.Nested(CompareRowSchema))
    rows_differing = fields.Integer()


class CompareSchema(Schema):
    job_id = fields.String()
    state = fields.String()
    models = fields.List(fields.Nested(CompareModelSchema))
    usage = fields.Nested(UsageSchema)


# Jobs per page of GET /jobs: each costs one count query, so a page stays small.
DEFAULT_JOBS_PAGE, MAX_JOBS_PAGE = 50, 200


class JobsQuerySchema(Schema):
    state = fields.String(validate=validate.OneOf(list(JOB_PHASES)))
    name = fields.String(
        validate=validate.Length(min=1, max=200),
        metadata={"description": "case-insensitive part of the job's name"},
    )
    limit = fields.Integer(
        load_default=DEFAULT_JOBS_PAGE, validate=validate.Range(1, MAX_JOBS_PAGE)
    )
    cursor = fields.String(metadata={"description": "next_cursor of the previous page"})


class JobsPageSchema(Schema):
    jobs = fields.List(fields.Nested(JobSchema))
    next_cursor = fields.String(allow_none=True)


class RetryBodySchema(Schema):
    regions = fields.List(
        fields.String(),
        validate=validate.Length(min=1),
        metadata={"description": "only executions requested in these regions"},
    )
    models = fields.List(
        fields.String(), validate=validate.Length(min=1), metadata={"description": "only these"}
    )
    include_cancelled = fields.Boolean(
        load_default=False, metadata={"description": "re-queue cancelled executions too"}
    )


class RetrySchema(Schema):
    job_id = fields.String()
    requeued = fields.Integer(metadata={"description": "executions queued again now"})
    state = fields.String()
    progress = fields.Dict()


def encode_cursor(created_at: float, job_id: str) -> str:
    """The position after a job in the newest-first listing, opaque to clients."""
    return cursors.encode([created_at, job_id])


def decode_cursor(cursor: str) -> tuple[float, str]:
    """A cursor back to (created_at, job_id); ValidationFailed if it was not ours."""

    def parse(values: list[Any]) -> tuple[float, str]:
        created_at, job_id = values
        return float(created_at), str(job_id)

    return cursors.decode(cursor, parse)


@blp.route("/jobs", methods=["GET"])
@blp.arguments(JobsQuerySchema, location="query")
@blp.response(200, JobsPageSchema)
def list_jobs(query: dict[str, Any]) -> dict[str, Any]:
    """The tenant's jobs, newest first, with their progress; filter by state (queued,
    running, finished, cancelling, cancelled) and by part of the name."""
    st = state()
    after = decode_cursor(query["cursor"]) if query.get("cursor") else None
    limit = query["limit"]
    found = st.store.list_jobs(
        JobQuery(g.tenant, limit + 1, after, query.get("state"), query.get("name"))
    )
    page, more = found[:limit], len(found) > limit
    now = st.clock()
    return {
        "jobs": [job_view(job, st.store.job_counts(job.id), now) for job in page],
        "next_cursor": encode_cursor(page[-1].created_at, page[-1].id) if more else None,
    }


@blp.route("/jobs/<job_id>/retry", methods=["POST"])
@blp.arguments(RetryBodySchema(), required=False)
@blp.response(200, RetrySchema)
@blp.alt_response(404, description="not_found")
@blp.alt_response(422, description="validation_error: a region or model not in the job")
def retry_job(body: dict[str, Any], job_id: str) -> dict[str, Any]:
    """Re-queue the job's dead executions (cancelled ones too with include_cancelled),
    only those of the given regions and models if any: each in its requested region,
    attempts starting over; the job runs again."""
    st = state()
    job = _owned_job(job_id)
    errors: dict[str, list[str]] = {}
    in_job = sorted({r for regions in job.regions_by_model.values() for r in regions})
    unknown = [r for r in body.get("regions") or [] if r not in in_job]
    if unknown:
        errors["regions"] = [f"not in this job: {unknown}; the job's regions: {in_job}"]
    unknown = [m for m in body.get("models") or [] if m not in job.models]
    if unknown:
        errors["models"] = [f"not in this job: {unknown}; the job's models: {job.models}"]
    if errors:
        raise ValidationFailed(details=errors)
    regions, models = body.get("regions"), body.get("models")
    requeued = st.store.retry_job(
        RetryRequest(
            tenant=g.tenant,
            job_id=job.id,
            now=st.clock(),
            include_cancelled=body.get("include_cancelled", False),
            regions=None if regions is None else tuple(regions),
            models=None if models is None else tuple(models),
        )
    )
    logger.info("job retry", extra={"job_id": job.id, "requeued": requeued})
    view = job_view(_owned_job(job_id), st.store.job_counts(job.id), st.clock())
    return {
        "job_id": job.id,
        "requeued": requeued,
        "state": view["state"],
        "progress": view["progress"],
    }


def job_comparison(job_id: str) -> dict[str, Any]:
    """The comparison of the tenant's job (404 if it is not theirs)."""
    st = state()
    job = _owned_job(job_id)
    views = [execution_view(e) for e in st.store.executions(job.id, with_attempts=False)]
    grid = compare.compare(views, job.models, job.regions_by_model)
    phase = job_view(job, st.store.job_counts(job.id), st.clock())["state"]
    usage = compare.usage_totals(views, st.regions.prices())
    return {"job_id": job.id, "state": phase, **grid, "usage": usage}


@blp.route("/jobs/<job_id>/compare", methods=["GET"])
@blp.response(200, CompareSchema)
@blp.alt_response(404, description="not_found (also another tenant's job)")
def get_compare(job_id: str) -> dict[str, Any]:
    """Per model, each question's answers side by side per region: whether they differ
    and how much, refusals, and word-level differences; usage and cost totals."""
    return job_comparison(job_id)


def init_app(api: Any) -> None:
    api.spec.components.schema("Question", schema=QuestionSchema)
    api.register_blueprint(blp)
