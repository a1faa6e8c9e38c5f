"""Reuse of identical calls: a job that asks for it (``params.reuse: true``) takes the answer
an earlier reusing job already got for the same call, instead of calling the executor again.

The key is (tenant, region the call runs in, model, question or chat messages, sample,
parameters): never across
tenants, never across regions (a region's answer is what is being compared), and the
parameters include max_tokens, temperature and seed. Only a call that should give the
same answer again is reused: temperature 0 (the executor's default) or a seed given.
Errors are never remembered, so a failed call is always tried for real.

Off by default, per job, because a reused answer is not a new observation: a study of
how a region answers *now* (drift, censorship over time, latency) needs fresh calls, and
remote providers are not strictly deterministic at temperature 0 either. Eval re-runs
that only need the answer turn it on and save the calls.

A reused execution succeeds at once with the original's result plus ``reused_from`` (the
original execution's id and request id); it is counted in ``dispatcher_reused_total``,
not in the calls metrics, and does not touch the circuit breaker.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from . import metrics
from .client import CallResult, Outcome
from .scheduler import Clock
from .store.base import Claim, Store
from .store.objects import StoredObject, objects_for

logger = logging.getLogger(__name__)

#: parameters that do not change the answer, left out of the key
NOT_IN_KEY = frozenset({"reuse", "timeout_s"})


def wanted(claim: Claim) -> bool:
    """The job asked for reuse and the call is deterministic enough to reuse."""
    params = claim.params
    if not params.get("reuse"):
        return False
    return float(params.get("temperature") or 0.0) == 0.0 or params.get("seed") is not None


def call_key(claim: Claim) -> str:
    params = {k: v for k, v in claim.params.items() if k not in NOT_IN_KEY}
    canonical = {
        "region": claim.region,
        "model": claim.model,
        "question": claim.question,
        # the chat messages of the call and its sample number (sample N of a seeded job
        # runs with seed + N), when the job model has them
        "messages": getattr(claim, "messages", None),
        "sample": getattr(claim, "sample", 0),
        "params": params,
    }
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


class CallReuse:
    """Looks answers up before a call and remembers them after, in the store beside the
    jobs (``store/objects.py``, kind ``call``), so every dispatcher process shares them."""

    def __init__(self, store: Store, clock: Clock) -> None:
        self.store = store
        self.clock = clock

    def lookup(self, claim: Claim) -> CallResult | None:
        """The earlier answer to this call, as a success marked ``reused_from``; or None."""
        if not wanted(claim):
            return None
        found = objects_for(self.store).get(claim.tenant, "call", call_key(claim))
        if found is None:
            return None
        body: dict[str, Any] = dict(found.body["result"])
        body["reused_from"] = {
            "execution_id": found.body["execution_id"],
            "job_id": found.body["job_id"],
            "request_id": found.body["request_id"],
        }
        return CallResult(Outcome.SUCCESS, body=body, reused=True)

    def count(self, claim: Claim, result: CallResult, elapsed_s: float) -> None:
        """After a claim ran: a real call is counted in the calls metrics (and its answer
        remembered for reuse), a reused answer only in ``dispatcher_reused_total``."""
        region = claim.region
        if result.reused:
            metrics.REUSED.labels(region).inc()
            return
        metrics.CALLS.labels(region, result.outcome.value).inc()
        metrics.CALL_SECONDS.labels(region).observe(max(0.0, elapsed_s))
        self.remember(claim, result)

    def remember(self, claim: Claim, result: CallResult) -> None:
        """Keep a real, successful answer of a reusing job (the first one wins)."""
        if not (result.ok and result.body is not None and wanted(claim)):
            return
        body = {
            "result": result.body,
            "execution_id": claim.execution_id,
            "job_id": claim.job_id,
            "request_id": result.body.get("request_id"),  # the executor echoes the call's id
        }
        key = call_key(claim)
        objects_for(self.store).put(StoredObject("call", key, claim.tenant, self.clock(), body))
