"""Global retry priority: a call that fails in region a is started by region b, before b's
own new work, within the backoff plus a small margin; with failover "none" it is retried
only in a.

Region a's executor always fails (502 provider_error); b answers. Backoff without jitter
(0.3 s for a first failure) so the expected start is known. Where a must not take its own
retry back, its circuit opens after one failure and stays open, except in the test of the
retry hand-off, which shows that a failing region leaves its due retry to an idle region
even with no circuit.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dispatcher_harness import (
    DispatcherProcess,
    calls_by_request_id,
    executor,
    wait_finished,
    write_regions,
)
from support import Gunicorn, wait_until

pytestmark = pytest.mark.slow
logger = logging.getLogger(__name__)

BACKOFF_S = 0.3
# Generous for a noisy 2-core machine; the D2 benchmark target is 100 ms.
MARGIN_S = 0.25
B_LATENCY_S = 0.4


@pytest.fixture(scope="module")
def executors(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gunicorn, Gunicorn]]:
    tmp = tmp_path_factory.mktemp("retry")
    failing = {"sim": {"provider": "simulated", "error_rate": 1.0, "status": 500}}
    healthy = {"sim": {"provider": "simulated", "latency_s": B_LATENCY_S}}
    with executor(tmp, "a", failing) as a, executor(tmp, "b", healthy) as b:
        yield a, b


def dispatcher(tmp: Path, executors: tuple[Gunicorn, Gunicorn], **env: str) -> DispatcherProcess:
    a, b = executors
    # b has one slot, so "before b's own new work" is a question of order, not of room.
    regions = write_regions(
        tmp / "regions.toml", {"a": (a.url, 2, ["sim"]), "b": (b.url, 1, ["sim"])}
    )
    settings = {
        "ES_BACKOFF_BASE_S": str(BACKOFF_S),
        "ES_BACKOFF_JITTER": "none",
        "ES_CIRCUIT_THRESHOLD": "1",
        "ES_CIRCUIT_COOLDOWN_S": "600",
        **env,
    }
    return DispatcherProcess(tmp, f"sqlite:///{tmp / 'd.db'}", regions, settings)


def only(executions: list[dict[str, Any]]) -> dict[str, Any]:
    assert len(executions) == 1
    return executions[0]


def test_idle_region_starts_the_retry_within_backoff_plus_margin(
    tmp_path: Path, executors: tuple[Gunicorn, Gunicorn]
) -> None:
    with dispatcher(tmp_path, executors) as d:
        api = d.api()
        job = api.submit(
            {"questions": ["q"], "models": ["sim"], "regions": ["a"], "failover": "any"}
        )
        wait_finished(api, job["id"])
        e = only(api.results(job["id"])["executions"])
    assert e["state"] == "succeeded" and e["executed_region"] == "b"
    failed, retried = e["attempt_log"]
    assert failed["region"] == "a" and failed["error"]["code"] == "provider_error"
    assert retried["region"] == "b" and retried["ok"]
    gap = retried["started_at"] - failed["finished_at"]
    logger.warning("retry started %.3f s after the failure (backoff %.1f s)", gap, BACKOFF_S)
    assert BACKOFF_S - 0.01 <= gap <= BACKOFF_S + MARGIN_S


def test_a_failed_call_goes_before_the_idle_regions_own_new_work(
    tmp_path: Path, executors: tuple[Gunicorn, Gunicorn]
) -> None:
    with dispatcher(tmp_path, executors) as d:
        api = d.api()
        own = api.submit(
            {"questions": ["b1", "b2", "b3", "b4"], "models": ["sim"], "regions": ["b"]}
        )
        wait_until(
            lambda: api.job(own["id"])["states"].get("leased"), 10, what="b busy with its own work"
        )
        failing = api.submit(
            {"questions": ["x"], "models": ["sim"], "regions": ["a"], "failover": "any"}
        )
        wait_finished(api, failing["id"])
        wait_finished(api, own["id"])
        x = only(api.results(failing["id"])["executions"])
        b_work = api.results(own["id"])["executions"]
    assert x["state"] == "succeeded" and x["executed_region"] == "b"
    retry_start = x["attempt_log"][-1]["started_at"]
    due = x["attempt_log"][0]["finished_at"] + BACKOFF_S
    own = sorted(
        (e["attempt_log"][0]["started_at"], e["attempt_log"][0]["finished_at"]) for e in b_work
    )
    # b's one slot is free at the due time, or as soon as the call it is running then ends.
    free_at = max((end for start, end in own if start <= due < end), default=due)
    t0 = own[0][0]
    logger.warning(
        "retry due at +%.3f, b free at +%.3f, retry started at +%.3f; b's own starts %s",
        due - t0,
        free_at - t0,
        retry_start - t0,
        [round(start - t0, 3) for start, _ in own],
    )
    assert free_at <= retry_start <= free_at + MARGIN_S
    # ... ahead of b's own questions still queued then
    assert any(start > retry_start for start, _ in own)


def test_failover_none_retries_only_in_the_requested_region(
    tmp_path: Path, executors: tuple[Gunicorn, Gunicorn]
) -> None:
    a, b = executors
    # No circuit here: a must get every attempt.
    with dispatcher(tmp_path, executors, ES_CIRCUIT_THRESHOLD="100") as d:
        api = d.api()
        job = api.submit(
            {
                "questions": ["q"],
                "models": ["sim"],
                "regions": ["a"],
                "failover": "none",
                "max_attempts": 3,
            }
        )
        wait_finished(api, job["id"])
        e = only(api.results(job["id"])["executions"])
    assert e["state"] == "dead" and e["executed_region"] == "a" and e["attempts"] == 3
    assert [att["region"] for att in e["attempt_log"]] == ["a", "a", "a"]
    assert e["last_error"]["code"] == "provider_error"
    assert e["last_error"]["gave_up"] == "max_attempts"
    calls = calls_by_request_id(a, b)
    mine = {rid: n for (rid, status), n in calls.items() if rid.startswith(job["id"])}
    assert sorted(mine) == [f"{job['id']}.{e['id']}.{n}" for n in (1, 2, 3)]
    assert set(mine.values()) == {1}
    assert f"{job['id']}." not in b.log()


def test_a_failing_region_leaves_its_due_retry_to_the_idle_region(
    tmp_path: Path, executors: tuple[Gunicorn, Gunicorn]
) -> None:
    # No circuit: a wakes when its retry falls due just as b does; only the hand-off
    # (a takes back its own failover-any retry 0.5 s after it is due, at the earliest)
    # keeps a from spending the attempts itself.
    with dispatcher(tmp_path, executors, ES_CIRCUIT_THRESHOLD="100") as d:
        api = d.api()
        job = api.submit(
            {
                "questions": ["q"],
                "models": ["sim"],
                "regions": ["a"],
                "failover": "any",
                "max_attempts": 3,
            }
        )
        wait_finished(api, job["id"])
        e = only(api.results(job["id"])["executions"])
    assert e["state"] == "succeeded" and e["executed_region"] == "b"
    assert [att["region"] for att in e["attempt_log"]] == ["a", "b"]
