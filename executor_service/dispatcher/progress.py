"""How far a job has got: succeeded, dead, cancelled and in progress counted apart,
for the job and per requested region, each with an ETA.

A cell that died or was cancelled is finished but not done: ``fraction`` is the
share that *succeeded*, so a job whose cells all died shows 0 %, not 100 %;
``finished_fraction`` is the share in a final state (what a progress bar of
"nothing left to wait for" shows).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

FINAL = ("succeeded", "dead", "cancelled")
# Why an ETA is null before any execution has finished.
NO_RATE_YET = "no execution finished yet"


def tally(states: Mapping[str, int], total: int | None = None) -> dict[str, Any]:
    """Counts per outcome of ``states`` (state -> executions); ``total`` defaults to
    their sum."""
    total = sum(states.values()) if total is None else total
    succeeded, dead, cancelled = (int(states.get(s, 0)) for s in FINAL)
    finished = succeeded + dead + cancelled
    return {
        "total": total,
        "succeeded": succeeded,
        "dead": dead,
        "cancelled": cancelled,
        "in_progress": max(total - finished, 0),
        "done": finished,  # kept for clients of the first version: executions in a final state
        "fraction": succeeded / total if total else 1.0,
        "finished_fraction": finished / total if total else 1.0,
    }


def eta_s(finished: int, total: int, elapsed_s: float) -> float | None:
    """Seconds left at the rate cells have finished so far (None before the first)."""
    if finished >= total:
        return 0.0
    if finished <= 0:
        return None
    rate = finished / max(elapsed_s, 1e-6)
    return round((total - finished) / rate, 3)


def region_progress(
    counts: Mapping[str, Mapping[str, int]], elapsed_s: float, order: list[str] | None = None
) -> list[dict[str, Any]]:
    """Per requested region (in ``order``, then the rest by name): its counts per
    state, its tally and its own ETA (regions run side by side, so each has its own)."""
    names = [r for r in (order or []) if r in counts]
    names += sorted(r for r in counts if r not in names)
    out = []
    for region in names:
        t = tally(counts[region])
        out.append(
            {
                "region": region,
                "counts": dict(counts[region]),
                **t,
                "eta_s": eta_s(t["done"], t["total"], elapsed_s),
            }
        )
    return out
