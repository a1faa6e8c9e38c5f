"""Marshmallow schemas of the dispatcher API: request validation and the OpenAPI document.

The request schema checks shape and types only; what depends on the regions
file (known models and regions, which region serves what) and on the size
limits in the settings is checked in ``jobs.py``.
"""

from __future__ import annotations

from typing import Any

from marshmallow import Schema, ValidationError, fields, validate, validates_schema

from ..executor.schemas import MAX_MESSAGES, MAX_PROMPT_CHARS, MessageSchema
from .store.base import Failover, State

# One idempotency key names one job per tenant; long enough for a UUID or a hash.
MAX_IDEMPOTENCY_KEY = 128
# Larger numbers run first; a bounded range keeps the column a plain integer.
PRIORITY_RANGE = (-1000, 1000)
# Backoff doubles per attempt: beyond 10 a job waits hours on a broken region.
MAX_ATTEMPTS_RANGE = (1, 10)
# Repeats of one cell: enough for a spread of answers at temperature > 0; each
# is its own execution, so more belongs in a second job.
MAX_SAMPLES = 100
MAX_NAME = 200
MAX_TAGS, MAX_TAG = 32, 64


class QuestionSchema(Schema):
    """A question as an object: its text or its chat messages, and its own system prompt."""

    text = fields.String(validate=validate.Length(min=1, max=MAX_PROMPT_CHARS))
    messages = fields.List(
        fields.Nested(MessageSchema),
        validate=validate.Length(min=1, max=MAX_MESSAGES),
        metadata={"description": "the conversation to answer (after the job's messages)"},
    )
    system = fields.String(
        validate=validate.Length(min=1, max=MAX_PROMPT_CHARS),
        metadata={"description": "this question's system prompt (instead of the job's)"},
    )

    @validates_schema
    def _text_xor_messages(self, data: dict[str, Any], **_: Any) -> None:
        if (data.get("text") is None) == (data.get("messages") is None):
            raise ValidationError("give exactly one of 'text' and 'messages'", "_schema")


class QuestionField(fields.Field):
    """A question: a string (its text), or an object (``QuestionSchema``). Loads as
    the object, so the rest of the code sees one shape."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        if isinstance(value, str):
            if not 1 <= len(value) <= MAX_PROMPT_CHARS:
                raise ValidationError(f"a question is 1 to {MAX_PROMPT_CHARS} characters")
            return {"text": value}
        if isinstance(value, dict):
            try:
                return QuestionSchema().load(value)
            except ValidationError as exc:
                raise ValidationError(exc.messages) from None
        raise ValidationError("a question is a string, or an object with text or messages")


# A week: longer is almost always a typo (and the default is a day).
MAX_DEADLINE_S = 7 * 86400.0


class JobParamsSchema(Schema):
    """Passed to every call of the job (see the executor's POST /execute)."""

    max_tokens = fields.Integer(strict=True, validate=validate.Range(min=1, max=4096))
    temperature = fields.Float(validate=validate.Range(min=0.0, max=2.0))
    seed = fields.Integer(strict=True, allow_none=True)
    timeout_s = fields.Float(
        validate=validate.Range(min=0.001, max=3600),
        metadata={"description": "per call; default: the region's timeout_s"},
    )
    reuse = fields.Boolean(
        metadata={
            "description": "take the answer of an identical earlier call (same tenant, region, "
            "model, question and parameters) when temperature is 0 or a seed is given; "
            "errors are never reused. Off by default (see README)"
        }
    )


class JobRequestSchema(Schema):
    """A job: every question is asked of every model in every requested region."""

    questions = fields.List(
        QuestionField(
            metadata={
                "description": "a string, or {text | messages, system?}",
                "oneOf": [{"type": "string"}, {"$ref": "#/components/schemas/Question"}],
            }
        ),
        required=True,
        validate=validate.Length(min=1),
    )
    system = fields.String(
        validate=validate.Length(min=1, max=MAX_PROMPT_CHARS),
        metadata={"description": "system prompt of every question (unless it has its own)"},
    )
    messages = fields.List(
        fields.Nested(MessageSchema),
        validate=validate.Length(min=1, max=MAX_MESSAGES),
        metadata={"description": "chat messages put before every question (few-shot turns)"},
    )
    samples = fields.Integer(
        strict=True,
        load_default=1,
        validate=validate.Range(1, MAX_SAMPLES),
        metadata={
            "description": "each question x model x region is asked this many times, each "
            "its own execution numbered 0..samples-1; more than 1 needs temperature > 0"
        },
    )
    name = fields.String(validate=validate.Length(min=1, max=MAX_NAME))
    tags = fields.List(
        fields.String(validate=validate.Length(min=1, max=MAX_TAG)),
        load_default=list,
        validate=validate.Length(max=MAX_TAGS),
    )
    models = fields.List(
        fields.String(validate=validate.Length(min=1, max=128)),
        required=True,
        validate=validate.Length(min=1),
    )
    regions = fields.List(
        fields.String(validate=validate.Length(min=1, max=64)),
        validate=validate.Length(min=1),
        metadata={"description": "default: every region serving each model"},
    )
    failover = fields.String(
        load_default=Failover.NONE.value,
        validate=validate.OneOf([f.value for f in Failover]),
        metadata={
            "description": "none (default): a failed call is retried only in its requested "
            "region, so a cross-region comparison never mixes regions silently; any: it may "
            "be retried in another region serving the model"
        },
    )
    max_attempts = fields.Integer(
        strict=True, load_default=3, validate=validate.Range(*MAX_ATTEMPTS_RANGE)
    )
    priority = fields.Integer(
        strict=True,
        load_default=0,
        validate=validate.Range(*PRIORITY_RANGE),
        metadata={"description": "higher runs first among one tenant's jobs"},
    )
    idempotency_key = fields.String(
        validate=validate.Length(min=1, max=MAX_IDEMPOTENCY_KEY),
        metadata={"description": "or the Idempotency-Key header"},
    )
    params = fields.Nested(JobParamsSchema, load_default=dict)
    deadline_s = fields.Float(
        validate=validate.Range(min=1, max=MAX_DEADLINE_S),
        metadata={
            "description": "schedule-to-close: seconds from submission after which what is "
            "left ends dead with deadline_exceeded (default ES_JOB_DEADLINE_S)"
        },
    )


class ProgressSchema(Schema):
    total = fields.Integer()
    succeeded = fields.Integer()
    dead = fields.Integer()
    cancelled = fields.Integer()
    in_progress = fields.Integer(metadata={"description": "queued, leased or waiting to retry"})
    done = fields.Integer(metadata={"description": "executions in a final state"})
    fraction = fields.Float(metadata={"description": "succeeded / total"})
    finished_fraction = fields.Float(metadata={"description": "final (any outcome) / total"})


# Why an ETA is null, in the job view and per region.
ETA_UNKNOWN = (
    "why eta_s is null: 'waiting on R (model: circuit open since T after code: message)' "
    "while the job needs region R and its circuit is not closed (failover none), or "
    "'no execution finished yet'; null when eta_s is a number"
)


class RegionProgressSchema(ProgressSchema):
    region = fields.String()
    counts = fields.Dict(keys=fields.String(), values=fields.Integer())
    eta_s = fields.Float(allow_none=True)
    eta_unknown = fields.String(allow_none=True, metadata={"description": ETA_UNKNOWN})


class JobSchema(Schema):
    """A job and how far it has got."""

    id = fields.String()
    tenant = fields.String()
    name = fields.String(allow_none=True)
    tags = fields.List(fields.String())
    state = fields.String(
        metadata={"description": "queued | running | finished | cancelled (cancel asked)"}
    )
    created_at = fields.Float(metadata={"description": "seconds since the epoch"})
    failover = fields.String()
    max_attempts = fields.Integer()
    priority = fields.Integer()
    models = fields.List(fields.String())
    regions_by_model = fields.Dict(keys=fields.String(), values=fields.List(fields.String()))
    questions = fields.Integer(metadata={"description": "how many questions"})
    samples = fields.Integer()
    params = fields.Dict()
    idempotency_key = fields.String(allow_none=True)
    cancelled = fields.Boolean()
    total = fields.Integer(
        metadata={"description": "executions (questions x models x regions x samples)"}
    )
    counts = fields.Dict(
        keys=fields.String(),
        values=fields.Dict(keys=fields.String(), values=fields.Integer()),
        metadata={"description": "requested region -> state -> executions"},
    )
    states = fields.Dict(keys=fields.String(), values=fields.Integer())
    progress = fields.Nested(ProgressSchema)
    regions = fields.List(
        fields.Nested(RegionProgressSchema), metadata={"description": "per requested region"}
    )
    eta_s = fields.Float(
        allow_none=True,
        metadata={
            "description": "seconds left at the completion rate seen so far; null while "
            "a region the job needs is down (eta_unknown says which)"
        },
    )
    eta_unknown = fields.String(allow_none=True, metadata={"description": ETA_UNKNOWN})
    deadline_at = fields.Float(allow_none=True, metadata={"description": "the job's deadline"})
    waiting = fields.Dict(
        metadata={
            "description": "region -> model -> why its work waits (GET /jobs/<id> only): "
            "reason (circuit open since T after the failure's code: message, rate "
            "limited, adaptive concurrency k of n, budget), circuit, circuit_open_until, "
            "not_before, and while the circuit is not closed since (ISO), since_at "
            "(epoch s), waited_s and last_error {code, message}: for the (region, "
            "model)s with work left"
        }
    )
    view_url = fields.String(metadata={"description": "the job's live page"})


class AttemptSchema(Schema):
    number = fields.Integer()
    region = fields.String()
    started_at = fields.Float()
    finished_at = fields.Float(allow_none=True)
    duration_ms = fields.Float(allow_none=True)
    ok = fields.Boolean()
    error = fields.Dict(allow_none=True, metadata={"description": "code, message, status..."})


class ExecutionSchema(Schema):
    """One question asked of one model in one region, with every attempt."""

    id = fields.Integer()
    question_index = fields.Integer()
    question = fields.String()
    messages = fields.List(
        fields.Dict(),
        allow_none=True,
        metadata={"description": "the call's chat messages; null: the question was the prompt"},
    )
    sample = fields.Integer(metadata={"description": "0..samples-1"})
    model = fields.String()
    requested_region = fields.String()
    executed_region = fields.String(allow_none=True)
    state = fields.String(metadata={"enum": [s.value for s in State]})
    attempts = fields.Integer(
        metadata={"description": "this round's attempts toward max_attempts (a retry starts over)"}
    )
    attempts_total = fields.Integer(metadata={"description": "every round's"})
    deferrals = fields.Integer(
        metadata={"description": "calls refused for rate or capacity (not attempts)"}
    )
    hedges = fields.Integer(
        metadata={"description": "second copies sent for a straggler (not attempts)"}
    )
    attempt_log = fields.List(fields.Nested(AttemptSchema))
    last_error = fields.Dict(allow_none=True)
    output = fields.String(allow_none=True)
    finish_reason = fields.String(allow_none=True)
    usage = fields.Dict(allow_none=True)
    timing = fields.Dict(allow_none=True, metadata={"description": "the executor's timing"})
    replica = fields.String(allow_none=True)
    reused_from = fields.Dict(
        allow_none=True,
        metadata={"description": "params.reuse: the execution whose answer this is"},
    )
    created_at = fields.Float()
    finished_at = fields.Float(allow_none=True)
    waiting_reason = fields.String(
        allow_none=True,
        metadata={
            "description": "queued (or, failover none, waiting to retry) in a region and "
            "model that cannot take it now: 'region/model: reason' as in the job's waiting"
        },
    )


# One page of results: enough for a screen, small enough to hold answers in memory.
MAX_RESULTS_PAGE = 10_000


class ResultsQuerySchema(Schema):
    format = fields.String(load_default=None, validate=validate.OneOf(["json", "csv", "jsonl"]))
    limit = fields.Integer(
        validate=validate.Range(1, MAX_RESULTS_PAGE),
        metadata={"description": "executions per JSON page (default 1000)"},
    )
    cursor = fields.String(
        validate=validate.Length(max=2000),
        metadata={"description": "next_cursor of the previous page (opaque)"},
    )


class ResultsSchema(Schema):
    job_id = fields.String()
    state = fields.String()
    total = fields.Integer(metadata={"description": "executions in the job"})
    executions = fields.List(fields.Nested(ExecutionSchema))
    next_cursor = fields.String(
        allow_none=True, metadata={"description": "pass as ?cursor= for the next page"}
    )


class CancelSchema(Schema):
    job_id = fields.String()
    cancelled = fields.Integer(metadata={"description": "executions cancelled now"})
    state = fields.String()


class RegionQueueSchema(Schema):
    region = fields.String()
    concurrency = fields.Integer()
    queued = fields.Integer(metadata={"description": "new work requested here"})
    retry_wait = fields.Integer(metadata={"description": "this region's own retries waiting"})
    in_flight = fields.Integer()
    circuit = fields.String(
        metadata={"description": "closed | open | half_open: its worst model's circuit"}
    )
    circuit_open_until = fields.Float(allow_none=True)
    models = fields.List(
        fields.Dict(),
        metadata={
            "description": "per model: circuit, not_before (rate limited until), adaptive "
            "concurrency and its ceiling, deferrals, budget (rpm/tpm and what is left)"
        },
    )


class QueueSchema(Schema):
    global_retry = fields.Integer(
        metadata={"description": "failed executions any region serving the model may retry"}
    )
    dead = fields.Integer()
    regions = fields.List(fields.Nested(RegionQueueSchema))
