"""Regions never wait for each other: with one region 4x slower than the others, the fast
regions finish all their questions long before the slow one, and the makespan is set by
the slow region alone (its work divided by its slots)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from dispatcher_harness import DispatcherProcess, executor, span, wait_finished, write_regions

pytestmark = pytest.mark.slow
logger = logging.getLogger(__name__)

FAST_S, SLOW_S = 0.1, 0.4  # seconds per call: the slow region is 4x slower
QUESTIONS = 12
SLOTS = 2


def test_fast_regions_do_not_wait_for_the_slow_one(tmp_path: Path) -> None:
    fast = {"sim": {"provider": "simulated", "latency_s": FAST_S}}
    slow = {"sim": {"provider": "simulated", "latency_s": SLOW_S}}
    with (
        executor(tmp_path, "fast-1", fast) as f1,
        executor(tmp_path, "fast-2", fast) as f2,
        executor(tmp_path, "slow", slow) as s,
    ):
        regions = write_regions(
            tmp_path / "regions.toml",
            {
                "fast-1": (f1.url, SLOTS, ["sim"]),
                "fast-2": (f2.url, SLOTS, ["sim"]),
                "slow": (s.url, SLOTS, ["sim"]),
            },
        )
        with DispatcherProcess(tmp_path, f"sqlite:///{tmp_path / 'd.db'}", regions) as d:
            api = d.api()
            job = api.submit(
                {
                    "questions": [f"question {i}" for i in range(QUESTIONS)],
                    "models": ["sim"],
                    "failover": "none",  # each region does its own share
                }
            )
            wait_finished(api, job["id"])
            executions = api.results(job["id"])["executions"]

    assert {e["state"] for e in executions} == {"succeeded"}
    by_region = {
        r: [e for e in executions if e["requested_region"] == r]
        for r in ("fast-1", "fast-2", "slow")
    }
    start, end = span(executions)
    makespan = end - start
    finish = {r: span(es)[1] - start for r, es in by_region.items()}
    slow_bound = QUESTIONS * SLOW_S / SLOTS  # the slow region's work over its slots
    fast_bound = QUESTIONS * FAST_S / SLOTS
    logger.warning(
        "makespan %.2f s (slow bound %.2f s, ratio %.2f); finish %s",
        makespan,
        slow_bound,
        makespan / slow_bound,
        {r: round(t, 2) for r, t in finish.items()},
    )
    # The fast regions are done in about their own bound, well before the slow one.
    for region in ("fast-1", "fast-2"):
        assert finish[region] < fast_bound * 2 + 0.5
        assert finish[region] < finish["slow"] / 2
    # The makespan is the slow region's own time: its lower bound plus a little overhead.
    assert finish["slow"] == pytest.approx(makespan)
    assert slow_bound <= makespan < slow_bound * 1.3
