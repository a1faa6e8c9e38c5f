"""The dispatcher when its PostgreSQL goes away and comes back (a proxy in front of the
database is cut: every connection dropped, new ones refused), as an operator sees it:

- store-bound requests answer 503 store_unavailable at once (not after the pool's
  30 s), and /health answers all along (a liveness probe must not restart a healthy
  dispatcher);
- an answer that came back from the executor during the outage is written when the
  store returns, with its lease: one call, one attempt, no re-run;
- the workers pick up new work promptly once the store is back.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
from dispatcher_harness import (
    KEYS,
    DispatcherProcess,
    calls_by_request_id,
    executor,
    postgres_database,
    wait_finished,
    write_regions,
)
from support import CuttableProxy, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

# A store-bound request during the outage answers within this (the pool waits 1 s).
ANSWERED_S = 5.0


def test_a_store_outage_answers_503_keeps_health_and_loses_no_result(tmp_path: Path) -> None:
    model = {"sim": {"provider": "simulated", "latency_s": 2.0}}
    with postgres_database() as db_url, executor(tmp_path, "r1", model) as region:
        parts = urlsplit(db_url)
        with CuttableProxy((parts.hostname or "127.0.0.1", parts.port or 5432)) as proxy:
            regions = write_regions(tmp_path / "regions.toml", {"r1": (region.url, 2, ["sim"])})
            with DispatcherProcess(tmp_path, proxy.url(db_url), regions) as dispatcher:
                api = dispatcher.api()
                headers = {"Authorization": f"Bearer {KEYS['alice']}"}
                job = api.submit({"questions": ["first"], "models": ["sim"]})
                wait_until(
                    lambda: api.job(job["id"])["states"].get("leased") == 1,
                    10,
                    what="the call in flight",
                )
                proxy.cut()
                cut_at = time.monotonic()

                answered: list[float] = []
                for _ in range(3):  # the first finds its connection broken, the next wait
                    started = time.monotonic()
                    r = requests.post(
                        dispatcher.url + "/jobs",
                        json={"questions": ["during"], "models": ["sim"]},
                        headers=headers,
                        timeout=60,
                    )
                    assert r.status_code == 503, r.text
                    assert r.json()["error"]["code"] == "store_unavailable"
                    answered.append(time.monotonic() - started)
                    assert answered[-1] < ANSWERED_S
                for _ in range(3):
                    started = time.monotonic()
                    assert requests.get(dispatcher.url + "/health", timeout=5).status_code == 200
                    assert time.monotonic() - started < 1.0

                # The executor answers the call (2 s) while the store is still away.
                wait_until(
                    lambda: any(status == 200 for _, status in calls_by_request_id(region)),
                    10,
                    what="the executor to answer during the outage",
                )
                # ... and the store stays away a while longer: the answer must wait for it.
                deadline = time.monotonic() + 3
                while time.monotonic() < deadline:
                    assert requests.get(dispatcher.url + "/health", timeout=5).status_code == 200
                    time.sleep(0.2)  # not synchronisation: the length of the outage
                assert time.monotonic() - cut_at < 20  # the store was away all along
                proxy.restore()
                back_at = time.monotonic()

                done = wait_finished(api, job["id"], timeout=30)
                assert done["state"] == "finished"
                (execution,) = api.results(job["id"])["executions"]
                assert execution["state"] == "succeeded" and execution["attempts"] == 1
                assert [a["error"] for a in execution["attempt_log"]] == [None]
                # one call at the executor for that execution: kept, not re-run
                assert sum(calls_by_request_id(region).values()) == 1

                # New work runs promptly once the store is back.
                kept_s = time.monotonic() - back_at
                later = api.submit({"questions": ["after"], "models": ["sim"]})
                wait_finished(api, later["id"], timeout=30)
                resumed_s = time.monotonic() - back_at
                assert resumed_s < 15
    if os.environ.get("CHAOS_REPORT"):
        figures = {
            "outage_503_s": [round(a, 3) for a in answered],
            "kept_result_written_after_return_s": round(kept_s, 2),
            "new_job_of_2s_call_done_after_return_s": round(resumed_s, 2),
        }
        with open(os.environ["CHAOS_REPORT"], "a") as out:
            out.write(json.dumps(figures) + "\n")
