"""OpenAI Batch API files as dispatcher jobs: reading and validating a batch input file,
turning it into jobs with a region fan-out, and the batch's status and output files.

An input file is JSONL, one request a line: ``{"custom_id", "method": "POST",
"url": "/v1/chat/completions", "body": {...chat completion request...}}``. It is
checked as OpenAI checks it (bad JSON, a missing or duplicate ``custom_id``,
another endpoint or method, a body the executor would refuse, a model no region
serves): any error fails the whole batch, and each error names its line.

Our extension: the batch's ``metadata`` (``{"regions": "eu,us", "failover":
"none"}``) or the extra fields ``regions`` / ``failover`` of ``POST /v1/batches``
choose the regions; every line then runs in each of them (default: every region
serving the line's model), and each output line carries ``custom_id`` and
``region``. Lines are grouped into one job per (model, parameters), so the
dispatcher's queues, retries, failover and fairness apply unchanged.

The batch's status is read from its jobs each time it is asked for (``in_progress``
until every execution is final, then ``completed``; ``cancelling``/``cancelled``
after a cancel), and the output and error files are built from the executions
when they are read: nothing is copied, so they are never out of date.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from marshmallow import ValidationError

from ..errors import ValidationFailed
from ..executor.openai_schemas import (
    OPENAI_DEFAULT_TEMPERATURE,
    ChatCompletionRequestSchema,
)
from ..openai_errors import flatten_messages
from .jobs import regions_by_model
from .regions import Regions
from .store.base import Execution, Failover, NewJob, State, Store
from .store.objects import ObjectStore, StoredObject

logger = logging.getLogger(__name__)

ENDPOINT = "/v1/chat/completions"
COMPLETION_WINDOWS = {"24h": 24 * 3600.0}
#: how many line errors a failed batch reports (OpenAI reports a sample, too)
MAX_REPORTED_ERRORS = 100
MAX_CUSTOM_ID = 512
LINE_KEYS = {"custom_id", "method", "url", "body"}
# NewJob takes per-question chat messages once the job model has them (issue 11);
# until then a line must be a single user message, and anything else is refused.
JOB_MESSAGES = "messages" in {f.name for f in dataclasses.fields(NewJob)}


@dataclass(frozen=True)
class BatchLine:
    """One valid request of an input file."""

    number: int  # 1-based line number in the file
    custom_id: str
    model: str
    messages: list[dict[str, str]]
    params: dict[str, Any]  # max_tokens, temperature, seed, timeout_s (the job's params)


@dataclass(frozen=True)
class LineError:
    code: str
    message: str
    line: int | None = None
    param: str | None = None

    def view(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "param": self.param, "line": self.line}


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _flat(messages: Any) -> str:
    return "; ".join(f"{k}: {v}" if k else v for k, v in flatten_messages(messages))


def parse_lines(
    content: bytes, regions: Regions, requested: list[str] | None, max_lines: int
) -> tuple[list[BatchLine], list[LineError]]:
    """Every line of an input file, checked; the batch fails if there is any error."""
    lines: list[BatchLine] = []
    errors: list[LineError] = []
    seen: dict[str, int] = {}
    schema = ChatCompletionRequestSchema()
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as exc:
        return [], [LineError("invalid_file", f"the file is not UTF-8: {exc}")]
    numbered = [(n, raw) for n, raw in enumerate(text.splitlines(), start=1) if raw.strip()]
    if not numbered:
        return [], [LineError("empty_file", "the file has no requests")]
    if len(numbered) > max_lines:
        return [], [
            LineError("too_many_tasks", f"{len(numbered)} requests; at most {max_lines} per batch")
        ]
    for number, raw in numbered:
        error = _check_line(number, raw, schema, seen, regions, requested)
        if isinstance(error, LineError):
            errors.append(error)
        else:
            lines.append(error)
    return lines, errors


def _check_line(
    number: int,
    raw: str,
    schema: ChatCompletionRequestSchema,
    seen: dict[str, int],
    regions: Regions,
    requested: list[str] | None,
) -> BatchLine | LineError:
    try:
        item = json.loads(raw)
    except ValueError as exc:
        return LineError("invalid_json_line", f"not valid JSON: {exc}", number)
    if not isinstance(item, dict):
        return LineError("invalid_json_line", "a line is a JSON object", number)
    for key in ("custom_id", "method", "url", "body"):
        if key not in item:
            return LineError("missing_required_parameter", f"{key} is required", number, key)
    unknown = sorted(set(item) - LINE_KEYS)
    if unknown:
        return LineError("invalid_request", f"unknown keys {unknown}", number, unknown[0])
    custom_id = item["custom_id"]
    if not isinstance(custom_id, str) or not 1 <= len(custom_id) <= MAX_CUSTOM_ID:
        return LineError(
            "invalid_request",
            f"custom_id is a string of 1 to {MAX_CUSTOM_ID} characters",
            number,
            "custom_id",
        )
    if custom_id in seen:
        return LineError(
            "duplicate_custom_id",
            f"custom_id {custom_id!r} is also on line {seen[custom_id]}",
            number,
            "custom_id",
        )
    seen[custom_id] = number
    if item["method"] != "POST":
        return LineError("invalid_method", "method must be POST", number, "method")
    if item["url"] != ENDPOINT:
        return LineError(
            "mismatched_endpoint",
            f"url {item['url']!r} differs from the batch's endpoint {ENDPOINT}",
            number,
            "url",
        )
    if not isinstance(item["body"], dict):
        return LineError("invalid_request", "body is a JSON object", number, "body")
    try:
        body = schema.load(item["body"])
    except ValidationError as exc:
        problems = exc.messages if isinstance(exc.messages, dict) else {"body": exc.messages}
        param = next(iter(problems), None)
        return LineError(
            "invalid_request", _flat(problems), number, f"body.{param}" if param else "body"
        )
    if body["stream"]:
        return LineError(
            "invalid_request", "stream is not supported in a batch", number, "body.stream"
        )
    messages = [
        {"role": "system" if m["role"] == "developer" else m["role"], "content": m["content"]}
        for m in body["messages"]
    ]
    if not JOB_MESSAGES and (len(messages) != 1 or messages[0]["role"] != "user"):
        return LineError(
            "invalid_request",
            "this dispatcher runs single user-message requests only (system prompts and "
            "conversations come with chat-message jobs)",
            number,
            "body.messages",
        )
    try:
        regions_by_model({"models": [body["model"]], "regions": requested}, regions)
    except ValidationFailed as exc:
        code = "model_not_found" if "models" in exc.details else "invalid_request"
        return LineError(code, _flat(exc.details), number, "body.model")
    temperature = body["temperature"]
    params: dict[str, Any] = {
        "temperature": OPENAI_DEFAULT_TEMPERATURE if temperature is None else temperature
    }
    max_tokens = body["max_completion_tokens"] or body["max_tokens"]
    if max_tokens is not None:
        params["max_tokens"] = max_tokens
    for name in ("seed", "timeout_s"):
        if body[name] is not None:
            params[name] = body[name]
    return BatchLine(number, custom_id, body["model"], messages, params)


def selection(
    metadata: Mapping[str, Any] | None, extra: Mapping[str, Any]
) -> tuple[list[str] | None, Failover]:
    """The regions and failover a batch asks for: the extra fields of POST /v1/batches,
    else its metadata (``regions`` comma separated). Raises ValidationFailed."""
    meta = metadata or {}
    raw_regions = extra.get("regions")
    if raw_regions is None:
        raw_regions = meta.get("regions")
    requested: list[str] | None
    if raw_regions is None or raw_regions == "":
        requested = None
    elif isinstance(raw_regions, str):
        requested = [r.strip() for r in raw_regions.split(",") if r.strip()]
    elif isinstance(raw_regions, list) and all(isinstance(r, str) for r in raw_regions):
        requested = list(raw_regions)
    else:
        raise ValidationFailed(details={"regions": ["a list of region names, or 'eu,us'"]})
    failover = extra.get("failover") or meta.get("failover") or Failover.NONE.value
    if failover not in {f.value for f in Failover}:
        raise ValidationFailed(details={"failover": ["must be 'none' or 'any'"]})
    return requested or None, Failover(failover)


def wants_reuse(metadata: Mapping[str, Any] | None, extra: Mapping[str, Any]) -> bool:
    """Reuse of identical calls (``reuse.py``): the extra field ``reuse``, else
    ``metadata["reuse"]`` ("true" / "false"). Raises ValidationFailed."""
    value = extra.get("reuse")
    if value is None:
        value = (metadata or {}).get("reuse")
    if value is None or isinstance(value, bool):
        return bool(value)
    if isinstance(value, str) and value.lower() in {"true", "false"}:
        return value.lower() == "true"
    raise ValidationFailed(details={"reuse": ["true or false"]})


def with_reuse(lines: list[BatchLine]) -> list[BatchLine]:
    return [dataclasses.replace(line, params={**line.params, "reuse": True}) for line in lines]


def plan_jobs(
    batch_id: str,
    tenant: str,
    lines: list[BatchLine],
    regions: Regions,
    requested: list[str] | None,
    failover: Failover,
    max_attempts: int = 3,
) -> list[tuple[NewJob, list[str]]]:
    """One job per (model, parameters), questions in file order; with each, the custom_id
    of each of its questions. Idempotency keys come from the batch id, so creating them
    again (after a crash half-way) gives the same jobs."""
    groups: dict[tuple[str, str], list[BatchLine]] = {}
    for line in lines:
        key = (line.model, json.dumps(line.params, sort_keys=True))
        groups.setdefault(key, []).append(line)
    planned = []
    for index, ((model, params_key), group) in enumerate(groups.items()):
        by_model = regions_by_model({"models": [model], "regions": requested}, regions)
        questions = [_question_text(line.messages) for line in group]
        extra: dict[str, Any] = {}
        if JOB_MESSAGES:
            extra["messages"] = [None if _plain(line.messages) else line.messages for line in group]
        canonical = json.dumps(
            [batch_id, index, model, params_key, [line.messages for line in group]],
            sort_keys=True,
        )
        job = NewJob(
            tenant=tenant,
            questions=questions,
            models=[model],
            regions_by_model=by_model,
            failover=failover,
            max_attempts=max_attempts,
            idempotency_key=f"{batch_id}:{index}",
            request_hash=hashlib.sha256(canonical.encode()).hexdigest(),
            params=dict(json.loads(params_key)),
            **extra,
        )
        planned.append((job, [line.custom_id for line in group]))
    return planned


def _plain(messages: list[dict[str, str]]) -> bool:
    return len(messages) == 1 and messages[0]["role"] == "user"


def _question_text(messages: list[dict[str, str]]) -> str:
    """What the job shows as the question: the last user message."""
    users = [m["content"] for m in messages if m["role"] == "user"]
    return users[-1] if users else messages[-1]["content"]


# -- status and output ----------------------------------------------------------------
@dataclass(frozen=True)
class Tally:
    total: int
    succeeded: int
    dead: int
    cancelled: int
    last_finished: float | None

    @property
    def pending(self) -> int:
        return self.total - self.succeeded - self.dead - self.cancelled


def tally(store: Store, job_ids: Iterable[str]) -> Tally:
    total = succeeded = dead = cancelled = 0
    for job_id in job_ids:
        for per_state in store.job_counts(job_id).values():
            for state, n in per_state.items():
                total += n
                succeeded += n if state == State.SUCCEEDED.value else 0
                dead += n if state == State.DEAD.value else 0
                cancelled += n if state == State.CANCELLED.value else 0
    return Tally(total, succeeded, dead, cancelled, None)


def batch_view(obj: StoredObject, store: Store, now: float) -> dict[str, Any]:
    """The OpenAI batch object, its status and counts read from its jobs now."""
    body = obj.body
    view = {k: v for k, v in body.items() if not k.startswith("_")}
    if body["status"] == "failed":
        return view
    counts = tally(store, [j["job_id"] for j in body.get("_jobs", [])])
    if body["status"] == "validating":
        status = "validating"
    elif body.get("cancelling_at") is not None:
        status = "cancelled" if counts.pending == 0 else "cancelling"
    elif counts.pending == 0:
        status = "completed"
    else:
        status = "in_progress"
    view["status"] = status
    view["request_counts"] = {
        "total": counts.total,
        "completed": counts.succeeded,
        "failed": counts.dead + counts.cancelled,
    }
    final = status in {"completed", "cancelled"}
    if final:
        done_at = body.get("_done_at") or now
        view["finalizing_at"] = int(done_at)
        view[f"{status}_at"] = int(done_at)
        if counts.succeeded:
            view["output_file_id"] = output_file_id(obj.id, "output")
        if counts.dead or counts.cancelled:
            view["error_file_id"] = output_file_id(obj.id, "errors")
    return view


def output_file_id(batch_id: str, which: str) -> str:
    return f"file-{batch_id}-{which}"


def parse_output_file_id(file_id: str) -> tuple[str, str] | None:
    """(batch id, "output" | "errors") for an output or error file's id."""
    if not file_id.startswith("file-batch_"):
        return None
    rest = file_id.removeprefix("file-")
    batch_id, _, which = rest.rpartition("-")
    return (batch_id, which) if which in {"output", "errors"} and batch_id else None


def completion_body(e: Execution) -> dict[str, Any]:
    """A succeeded execution's answer as OpenAI's chat.completion object."""
    result = e.result or {}
    usage = result.get("usage") or {}
    prompt = int(usage.get("prompt_tokens") or 0)
    completion = int(usage.get("completion_tokens") or 0)
    return {
        "id": f"chatcmpl-{result.get('request_id') or e.id}",
        "object": "chat.completion",
        "created": int(e.finished_at or e.created_at),
        "model": e.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": e.output or "", "refusal": None},
                "logprobs": None,
                "finish_reason": result.get("finish_reason") or "stop",
            }
        ],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
        "system_fingerprint": None,
        "executor": {
            "region": result.get("region"),
            "replica": result.get("replica"),
            "provider": result.get("provider"),
        },
    }


def output_line(e: Execution, custom_id: str) -> tuple[str, dict[str, Any]] | None:
    """("output" | "errors", the line) for a final execution; None while it runs."""
    base = {
        "id": f"batch_req_{e.job_id[:12]}_{e.id}",
        "custom_id": custom_id,
        "region": e.requested_region,
        "executed_region": e.executed_region,
    }
    if e.state == State.SUCCEEDED:
        request_id = (e.result or {}).get("request_id")
        ok = {"status_code": 200, "request_id": request_id, "body": completion_body(e)}
        return "output", {**base, "response": ok, "error": None}
    if e.state == State.DEAD:
        err = e.last_error or {}
        code = str(err.get("code") or "failed")
        message = str(err.get("message") or "the request failed")
        status = err.get("status")
        response: dict[str, Any] | None = None
        if isinstance(status, int):
            body = {
                "error": {
                    "message": message,
                    "type": "server_error" if status >= 500 else "invalid_request_error",
                    "param": None,
                    "code": code,
                }
            }
            response = {"status_code": status, "request_id": None, "body": body}
        return "errors", {**base, "response": response, "error": {"code": code, "message": message}}
    if e.state == State.CANCELLED:
        error = {"code": "batch_cancelled", "message": "the batch was cancelled before it ran"}
        return "errors", {**base, "response": None, "error": error}
    return None


def output_lines(obj: StoredObject, store: Store, which: str) -> Iterator[str]:
    """The output ("output") or error ("errors") file of a batch, line by line: in file
    order, each line's regions in the order of its job's executions."""
    for job in obj.body.get("_jobs", []):
        custom_ids: list[str] = job["custom_ids"]
        for e in store.executions(job["job_id"], with_attempts=False):
            found = output_line(e, custom_ids[e.question_index])
            if found is not None and found[0] == which:
                yield json.dumps(found[1], separators=(",", ":"), ensure_ascii=False) + "\n"


def file_view(obj: StoredObject) -> dict[str, Any]:
    return {k: v for k, v in obj.body.items() if not k.startswith("_")}


def materialize(objects: ObjectStore, store: Store, obj: StoredObject, now: float) -> StoredObject:
    """Create the jobs a validated batch planned (idempotent: a crash between the batch
    and its jobs is finished by the next read), then mark it in progress."""
    body = dict(obj.body)
    plan = body.get("_plan")
    if body["status"] != "validating" or plan is None:
        return obj
    jobs = []
    for item in plan:
        new = NewJob(**{**item["job"], "failover": Failover(item["job"]["failover"])})
        job, _ = store.create_job(new, now)
        jobs.append({"job_id": job.id, "custom_ids": item["custom_ids"]})
    body.pop("_plan")
    body.update(_jobs=jobs, status="in_progress", in_progress_at=int(now))
    objects.update_body(obj.tenant, "batch", obj.id, body)
    return dataclasses.replace(obj, body=body)


def plan_body(planned: list[tuple[NewJob, list[str]]]) -> list[dict[str, Any]]:
    """The planned jobs as JSON, kept in the batch until they exist."""
    return [
        {"job": {**dataclasses.asdict(job), "failover": job.failover.value}, "custom_ids": ids}
        for job, ids in planned
    ]
