"""What the API shows of pacing: each (region, model)'s shared state (``GET /queue``)
and, for a job, why the work it has left waits (``GET /jobs/<id>`` ``waiting``, the
``--follow`` bars)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .pacing import Pace, refill
from .regions import Region

FINAL_STATES = ("succeeded", "dead", "cancelled")


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
    }
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
    if view["circuit"] != "closed":
        parts.append(f"circuit {view['circuit']}")
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
