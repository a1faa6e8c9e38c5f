"""What the API shows of pacing: each (region, model)'s shared state (``GET /queue``)
and, for a job, why the work it has left waits (``GET /jobs/<id>`` ``waiting``, the
``--follow`` bars, the job page): which region and model, since when, why (the failure
that opened the circuit); which regions' ETAs are unknown because of it; and the
reason each execution still waiting there carries (``waiting_reason``).

The rules live here once: the job view, the results and the exports ask these
functions, the CLI and the page only show what they answered."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .exports import iso
from .pacing import Pace, refill
from .regions import Region

FINAL_STATES = ("succeeded", "dead", "cancelled")
CLOSED = "closed"


def pace_view(pace: Pace, region: Region | None, now: float) -> dict[str, Any]:
    """One (region, model): circuit, rate-limit wait, adaptive concurrency, budget use."""
    budget = region.budget(pace.model) if region is not None else None
    view: dict[str, Any] = {
        "model": pace.model,
        "circuit": pace.circuit,
        "circuit_open_until": pace.circuit_open_until,
        "not_before": pace.not_before if pace.not_before and pace.not_before > now else None,
        "concurrency": pace.limit,
        "max_concurrency": pace.max_limit,
        "deferrals": pace.deferrals,
        "budget": None,
        # While the circuit is not closed: since when (ISO and epoch seconds, and how
        # long), and the failure that opened it ({code, message}).
        "since": None,
        "since_at": None,
        "waited_s": None,
        "last_error": None,
    }
    if pace.circuit != CLOSED:
        view["last_error"] = pace.circuit_error
        if pace.circuit_since is not None:
            view["since"] = iso(pace.circuit_since)
            view["since_at"] = pace.circuit_since
            view["waited_s"] = round(max(0.0, now - pace.circuit_since), 3)
    if budget is not None and budget.limited:
        level = refill(pace, budget, now)
        view["budget"] = {
            "rpm": budget.rpm,
            "tpm": budget.tpm,
            "window_s": budget.window_s,
            "requests_left": None if level.requests is None else round(level.requests, 3),
            "tokens_left": None if level.tokens is None else round(level.tokens, 1),
        }
    view["reason"] = reason(view)
    return view


def reason(view: Mapping[str, Any]) -> str | None:
    """A short human reason, most binding first (None: nothing holds it back)."""
    parts = []
    if view["circuit"] != CLOSED:
        circuit = f"circuit {view['circuit']}"
        if view.get("since"):
            circuit += f" since {view['since']}"
        error = view.get("last_error")
        if error:
            circuit += f" after {error.get('code')}: {error.get('message')}"
        parts.append(circuit)
    if view["not_before"] is not None:
        parts.append("rate limited")
    if view["concurrency"] < view["max_concurrency"]:
        parts.append(f"concurrency {view['concurrency']} of {view['max_concurrency']}")
    budget = view.get("budget")
    if budget and budget.get("requests_left") is not None and budget["requests_left"] < 1:
        parts.append("rpm budget")
    if budget and budget.get("tokens_left") is not None and budget["tokens_left"] <= 0:
        parts.append("tpm budget")
    return ", ".join(parts) or None


def waiting_view(
    counts: Mapping[str, Mapping[str, int]],
    models: Sequence[str],
    paces: Sequence[Pace],
    regions: Mapping[str, Region],
    now: float,
) -> dict[str, dict[str, Any]]:
    """region -> model -> pace view, for the job's regions with work left, the job's
    models only, and only where something holds the work back."""
    out: dict[str, dict[str, Any]] = {}
    left = {
        region
        for region, states in counts.items()
        if any(n for s, n in states.items() if s not in FINAL_STATES)
    }
    for pace in paces:
        if pace.region not in left or pace.model not in models:
            continue
        view = pace_view(pace, regions.get(pace.region), now)
        if view["reason"] is not None:
            out.setdefault(pace.region, {})[pace.model] = view
    return out


def blocked(waiting: Mapping[str, Mapping[str, Any]], failover: str) -> dict[str, str]:
    """region -> why its ETA is unknown: under failover "none" a region whose circuit is
    not closed for a model of the job cannot finish until it comes back, however fast
    the rest goes (under "any" its work flows to the other regions)."""
    if failover != "none":
        return {}
    out = {}
    for region, models in waiting.items():
        down = [f"{m}: {v['reason']}" for m, v in sorted(models.items()) if v["circuit"] != CLOSED]
        if down:
            out[region] = f"waiting on {region} ({'; '.join(down)})"
    return out


def waiting_reason(
    waiting: Mapping[str, Mapping[str, Any]], failover: str, state: str, region: str, model: str
) -> str | None:
    """Why one execution has not run (yet): the reason of its requested region and model,
    for work queued there, or (failover "none") waiting there to retry."""
    if state != "queued" and not (state == "retry_wait" and failover == "none"):
        return None
    view = waiting.get(region, {}).get(model)
    return None if view is None else f"{region}/{model}: {view['reason']}"
