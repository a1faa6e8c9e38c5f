"""The researcher's workbench routes: the cross-region comparison of a job's answers.

    GET /jobs/<id>/compare      per model a grid question x region, how the regions'
                                answers differ, refusals, usage and cost (compare.py)

Kept beside ``api.py`` (submit, follow, results, cancel) so each module stays about
one thing; both share ``api.state()`` and its tenant check.
"""

from __future__ import annotations

import logging
from typing import Any

from flask_smorest import Blueprint
from marshmallow import Schema, fields

from . import compare
from .api import _owned_job, execution_view, job_view, state
from .schemas import QuestionSchema

logger = logging.getLogger(__name__)

blp = Blueprint("workbench_api", __name__, description="Compare, list and re-run jobs.")


class UsageTotalSchema(Schema):
    executions = fields.Integer(metadata={"description": "answered calls counted"})
    prompt_tokens = fields.Integer()
    completion_tokens = fields.Integer()
    cost_usd = fields.Float(
        allow_none=True,
        metadata={"description": "from the regions file's prices; null unless every call is priced"},
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
    differs = fields.Boolean(metadata={"description": "the finished regions' answers differ"})
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
