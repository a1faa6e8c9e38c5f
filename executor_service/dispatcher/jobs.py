"""From a job request to a ``NewJob``: checks against the regions file and the size limits,
region defaults, and the request hash that makes idempotency keys safe.

The schema has already checked shapes and types; here we check what depends on
configuration. Every refusal is a ``ValidationFailed`` (422) whose details name
the field, so a client can fix the request without reading logs.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any

from ..errors import ValidationFailed
from ..executor.schemas import MAX_PROMPT_CHARS
from .config import DispatcherSettings
from .regions import Regions
from .store.base import Claim, Failover, NewJob

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobLimits:
    """How large one job may be."""

    max_questions: int
    max_executions: int
    # a job without deadline_s gets this one (ES_JOB_DEADLINE_S)
    default_deadline_s: float | None = DispatcherSettings.default("job_deadline_s")

    @classmethod
    def from_settings(cls, settings: DispatcherSettings) -> JobLimits:
        return cls(settings.max_job_questions, settings.max_job_executions, settings.job_deadline_s)


def _duplicates(items: list[str]) -> list[str]:
    seen: set[str] = set()
    dups: list[str] = []
    for item in items:
        if item in seen and item not in dups:
            dups.append(item)
        seen.add(item)
    return dups


def request_hash(body: dict[str, Any]) -> str:
    """SHA-256 of the canonical request (after defaults, without the idempotency key):
    the same key with the same request gives the same job, with another one a 409."""
    canonical = {k: v for k, v in body.items() if k != "idempotency_key"}
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def regions_by_model(body: dict[str, Any], regions: Regions) -> dict[str, list[str]]:
    """Model -> the regions it runs in: the requested ones (each must serve every model),
    or by default every region serving the model. Raises ValidationFailed naming the field."""
    models: list[str] = body["models"]
    errors: dict[str, list[str]] = {}
    dup_models = _duplicates(models)
    if dup_models:
        errors.setdefault("models", []).append(f"listed more than once: {dup_models}")
    unknown_models = [m for m in models if not regions.serving(m)]
    if unknown_models:
        errors.setdefault("models", []).append(
            f"no region serves {unknown_models}; known models: {regions.models()}"
        )
    requested: list[str] | None = body.get("regions")
    if requested is not None:
        dup_regions = _duplicates(requested)
        if dup_regions:
            errors.setdefault("regions", []).append(f"listed more than once: {dup_regions}")
        unknown_regions = [r for r in requested if r not in regions]
        if unknown_regions:
            errors.setdefault("regions", []).append(
                f"unknown regions {unknown_regions}; known regions: {regions.names()}"
            )
        for model in models:
            if model in unknown_models:
                continue
            missing = [r for r in requested if r in regions and not regions[r].serves(model)]
            if missing:
                errors.setdefault("regions", []).append(
                    f"model {model!r} is not served in {missing}; "
                    f"it is served in {regions.serving(model)}"
                )
    if errors:
        raise ValidationFailed(details=errors)
    if requested is None:
        return {m: regions.serving(m) for m in models}
    return {m: list(requested) for m in models}


def question_call(
    question: dict[str, Any], system: str | None, prefix: list[dict[str, str]]
) -> tuple[str, list[dict[str, str]] | None]:
    """A loaded question (``QuestionSchema``) as (its text, the messages of its call).
    Messages are None for a plain text question with no system prompt and no job
    messages: it is sent as ``prompt``, exactly as before chat messages existed.
    Otherwise: the system prompt (the question's, else the job's), the job's
    messages, then the question's messages or its text as a user turn."""
    own = question.get("messages")
    text = question.get("text")
    if text is None:
        users = [m["content"] for m in own or [] if m["role"] == "user"]
        text = users[-1] if users else (own or [{"content": ""}])[-1]["content"]
    system = question.get("system") or system
    if own is None and system is None and not prefix:
        return text, None
    messages: list[dict[str, str]] = []
    if system is not None:
        messages.append({"role": "system", "content": system})
    messages += [dict(m) for m in prefix]
    messages += [dict(m) for m in own] if own is not None else [{"role": "user", "content": text}]
    return text, messages


def _calls(body: dict[str, Any]) -> tuple[list[str], list[list[dict[str, str]] | None]]:
    """Every question's text and call messages; ValidationFailed names a question whose
    call would be longer than one call may be."""
    texts: list[str] = []
    calls: list[list[dict[str, str]] | None] = []
    errors: dict[str, list[str]] = {}
    for index, question in enumerate(body["questions"]):
        text, messages = question_call(question, body.get("system"), body.get("messages") or [])
        size = len(text) if messages is None else sum(len(m["content"]) for m in messages)
        if size > MAX_PROMPT_CHARS:
            errors[f"questions[{index}]"] = [
                f"with the system prompt and the job's messages it holds {size} characters; "
                f"at most {MAX_PROMPT_CHARS}"
            ]
        texts.append(text)
        calls.append(messages)
    if errors:
        raise ValidationFailed(details=errors)
    return texts, calls


def build_job(
    body: dict[str, Any],
    tenant: str,
    regions: Regions,
    limits: JobLimits,
    header_key: str | None = None,
) -> NewJob:
    """Check a loaded ``JobRequestSchema`` body and turn it into a ``NewJob`` for ``tenant``.

    ``header_key`` is the Idempotency-Key header; it may repeat the body's key but
    not contradict it."""
    body_key = body.get("idempotency_key")
    if header_key is not None:
        header_key = header_key.strip()
        if not header_key or len(header_key) > 128:
            raise ValidationFailed(details={"Idempotency-Key": ["must be 1 to 128 characters"]})
        if body_key is not None and body_key != header_key:
            raise ValidationFailed(
                details={"idempotency_key": ["differs from the Idempotency-Key header; give one"]}
            )
    key = body_key if body_key is not None else header_key

    questions = body["questions"]
    if len(questions) > limits.max_questions:
        raise ValidationFailed(
            details={
                "questions": [f"{len(questions)} questions; at most {limits.max_questions} per job"]
            }
        )
    by_model = regions_by_model(body, regions)
    samples: int = body.get("samples", 1)
    total = len(questions) * sum(len(r) for r in by_model.values()) * samples
    if total > limits.max_executions:
        raise ValidationFailed(
            details={
                "questions": [
                    f"the job expands into {total} executions (questions x models x regions "
                    f"x samples); at most {limits.max_executions} per job"
                ]
            }
        )
    params = {k: v for k, v in (body.get("params") or {}).items() if v is not None}
    if samples > 1 and not params.get("temperature"):
        raise ValidationFailed(
            details={
                "samples": [
                    f"{samples} samples at temperature 0 would be {samples} copies of one "
                    "answer: set params.temperature > 0"
                ]
            }
        )
    texts, calls = _calls(body)
    # Plain-string questions hash as they did before questions could be objects, and
    # the new fields only when given, so a client's retried request keeps its job.
    plain = all(set(q) == {"text"} for q in questions)
    canonical: dict[str, Any] = {
        "questions": [q["text"] for q in questions] if plain else questions,
        "models": body["models"],
        # as requested, not as resolved: a region added to the file later must not
        # turn a retry of the same request into a 409
        "regions": body.get("regions"),
        "failover": body["failover"],
        "max_attempts": body["max_attempts"],
        "priority": body["priority"],
        "params": params,
        "deadline_s": body.get("deadline_s"),
    }
    extra = {k: body.get(k) for k in ("system", "messages", "name", "tags")}
    canonical.update({k: v for k, v in extra.items() if v})
    if samples != 1:
        canonical["samples"] = samples
    return NewJob(
        tenant=tenant,
        questions=texts,
        messages=calls,
        samples=samples,
        name=body.get("name"),
        tags=list(body.get("tags") or []),
        models=list(body["models"]),
        regions_by_model=by_model,
        failover=Failover(body["failover"]),
        max_attempts=body["max_attempts"],
        priority=body["priority"],
        idempotency_key=key,
        request_hash=request_hash(canonical),
        params=params,
        deadline_s=body.get("deadline_s") or limits.default_deadline_s,
    )


def request_id_for(claim: Claim) -> str:
    """The executor request id of one call: job, execution and call number (attempts,
    deferrals and hedges), so the executor's logs show every call of every execution
    exactly once."""
    return f"{claim.job_id}.{claim.execution_id}.{claim.call}"


def call_params(claim: Claim) -> dict[str, Any]:
    """The job's call parameters for this execution: its chat messages, when it has
    them (the client sends them instead of the prompt), and for sample N of a seeded
    job the seed + N, so samples differ and each is reproducible."""
    params = dict(claim.params)
    if claim.messages is not None:
        params["messages"] = claim.messages
    if claim.sample and params.get("seed") is not None:
        params["seed"] = int(params["seed"]) + claim.sample
    return params
