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
from .config import DispatcherSettings
from .regions import Regions
from .store.base import Failover, NewJob

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

    questions: list[str] = body["questions"]
    if len(questions) > limits.max_questions:
        raise ValidationFailed(
            details={
                "questions": [f"{len(questions)} questions; at most {limits.max_questions} per job"]
            }
        )
    by_model = regions_by_model(body, regions)
    total = len(questions) * sum(len(r) for r in by_model.values())
    if total > limits.max_executions:
        raise ValidationFailed(
            details={
                "questions": [
                    f"the job expands into {total} executions (questions x models x regions); "
                    f"at most {limits.max_executions} per job"
                ]
            }
        )
    params = {k: v for k, v in (body.get("params") or {}).items() if v is not None}
    canonical = {
        "questions": questions,
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
    return NewJob(
        tenant=tenant,
        questions=list(questions),
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
