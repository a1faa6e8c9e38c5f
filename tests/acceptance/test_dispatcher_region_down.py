"""A region whose executor is down (nothing listens on its port). With failover "any" the
job completes through the other regions, each execution records where it really ran, and
once the region's circuit opens its queued work goes to the other regions without being
tried there; with failover "none" that region's executions end dead-lettered with a clear
error and the other regions' succeed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import requests
from dispatcher_harness import KEYS, DispatcherProcess, executor, wait_finished, write_regions
from support import free_port

pytestmark = pytest.mark.slow

QUESTIONS = ["q0", "q1", "q2", "q3"]
# Enough that "one attempt per execution in the dead region" and "about the circuit
# threshold" are far apart.
ANY_QUESTIONS = [f"a{i}" for i in range(16)]
THRESHOLD = 2


def test_down_region_fails_over_or_dead_letters(tmp_path: Path) -> None:
    model = {"sim": {"provider": "simulated", "latency_s": 0.05}}
    down_url = f"http://127.0.0.1:{free_port()}"
    with executor(tmp_path, "up-1", model) as up1, executor(tmp_path, "up-2", model) as up2:
        regions = write_regions(
            tmp_path / "regions.toml",
            {
                "down": (down_url, 2, ["sim"]),
                "up-1": (up1.url, 2, ["sim"]),
                "up-2": (up2.url, 2, ["sim"]),
            },
        )
        env = {
            "ES_BACKOFF_BASE_S": "0.05",
            "ES_BACKOFF_JITTER": "none",
            "ES_CIRCUIT_THRESHOLD": str(THRESHOLD),
            "ES_CIRCUIT_COOLDOWN_S": "0.3",
        }
        with DispatcherProcess(tmp_path, f"sqlite:///{tmp_path / 'd.db'}", regions, env) as d:
            api = d.api()
            anyjob = api.submit(
                {
                    "questions": ANY_QUESTIONS,
                    "models": ["sim"],
                    "failover": "any",
                    "max_attempts": 5,
                }
            )
            nonejob = api.submit(
                {"questions": QUESTIONS, "models": ["sim"], "failover": "none", "max_attempts": 3}
            )
            wait_finished(api, anyjob["id"])
            wait_finished(api, nonejob["id"])
            any_runs = api.results(anyjob["id"])["executions"]
            none_runs = api.results(nonejob["id"])["executions"]
            queue = api.queue()
            metrics = requests.get(
                f"{d.url}/metrics", headers={"Authorization": f"Bearer {KEYS['alice']}"}, timeout=10
            ).text

    assert len(any_runs) == 3 * len(ANY_QUESTIONS) and len(none_runs) == 12
    # failover any: everything succeeded; the down region's share ran elsewhere
    assert {e["state"] for e in any_runs} == {"succeeded"}
    moved = [e for e in any_runs if e["requested_region"] == "down"]
    assert len(moved) == len(ANY_QUESTIONS)
    for e in moved:
        assert e["executed_region"] in {"up-1", "up-2"}
        *failed, answered = e["attempt_log"]
        assert answered["region"] == e["executed_region"] and answered["ok"]
        assert all(a["region"] == "down" for a in failed)
        assert all(a["error"]["code"] == "connection_error" for a in failed)
    # Once its circuit opened, the dead region's queued work was handed over untried: it
    # made about THRESHOLD attempts (plus a probe or two), not one or more per execution.
    tried_in_down = sum(len(e["attempt_log"]) - 1 for e in moved)
    assert 1 <= tried_in_down <= THRESHOLD + 2
    for e in any_runs:
        if e["requested_region"] != "down":
            assert e["executed_region"] == e["requested_region"]

    # failover none: the down region's executions are dead, with the reason; the rest answered
    for e in none_runs:
        if e["requested_region"] == "down":
            assert e["state"] == "dead" and e["attempts"] == 3
            assert {a["region"] for a in e["attempt_log"]} == {"down"}
            assert e["last_error"]["code"] == "connection_error"
            assert down_url.removeprefix("http://") in e["last_error"]["message"]
            assert e["last_error"]["gave_up"] == "max_attempts"
        else:
            assert e["state"] == "succeeded" and e["executed_region"] == e["requested_region"]
    assert queue["dead"] == 4
    down = next(q for q in queue["regions"] if q["region"] == "down")
    assert down["circuit"] in {"open", "half_open"}

    # The API's /metrics shows the region workers' counters (another process) too.
    def value(sample: str) -> float:
        found = re.search(rf"^{re.escape(sample)} (\S+)$", metrics, re.MULTILINE)
        assert found, sample
        return float(found.group(1))

    assert value('dispatcher_dead_letters_total{reason="max_attempts",region="down"}') == 4
    moved_retries = sum(
        value(f'dispatcher_cross_region_retries_total{{region="{r}"}}') for r in ("up-1", "up-2")
    )
    assert moved_retries >= len(ANY_QUESTIONS)
    assert value('dispatcher_calls_total{outcome="success",region="up-1"}') >= 20
    assert value('dispatcher_queue_depth{queue="queued",region="down"}') == 0
    assert value('dispatcher_circuit_open{region="down"}') == 1
