"""A region that dies mid-job under failover "none" (the default), as a researcher sees it.

Two regions on real gunicorn executors, the real ``executor-service dispatcher``; the
executor of one region is killed (kill -9, workers first) while the job runs. GET
/jobs/<id> then names the dead region and model, since when its circuit is open and why
(the refused connection), gives no ETA "as if healthy" (null, and why), and the
executions still queued there carry the reason; the live region finishes meanwhile.
The executor is started again on the same port: the circuit's next probe closes it and
the job finishes, every execution answered in the region it was asked in.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import requests
from dispatcher_harness import DispatcherProcess, executor, wait_finished, write_regions
from support import Gunicorn, wait_until

pytestmark = pytest.mark.slow

QUESTIONS = [f"q{i}" for i in range(12)]
MODEL = {"sim": {"provider": "simulated", "latency_s": 0.15}}
FAILED_CONNECTION = re.compile(
    r"connection refused|reset by peer|connection aborted", re.IGNORECASE
)


def kill(ex: Gunicorn) -> None:
    """kill -9 the executor: its workers first (an orphaned worker would keep serving
    its socket for a moment), then the master; nothing listens on its port after."""
    assert ex.proc is not None
    for pid in ex.worker_pids():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    ex.stop(signal.SIGKILL)


def refused(url: str) -> bool:
    try:
        requests.get(url + "/health", timeout=2)
    except requests.ConnectionError:
        return True
    return False


def test_a_dead_region_says_which_since_when_and_why_then_the_job_finishes(
    tmp_path: Path,
) -> None:
    with executor(tmp_path, "alive", MODEL) as alive, executor(tmp_path, "doomed", MODEL) as doomed:
        regions = write_regions(
            tmp_path / "regions.toml",
            {"alive": (alive.url, 1, ["sim"]), "doomed": (doomed.url, 1, ["sim"])},
        )
        # A probe every 3 s: a few during the outage, each an attempt of one execution.
        env = {"ES_CIRCUIT_THRESHOLD": "2", "ES_CIRCUIT_COOLDOWN_S": "3"}
        with DispatcherProcess(tmp_path, f"sqlite:///{tmp_path / 'd.db'}", regions, env) as d:
            api = d.api()
            # failover "none" is the default; attempts enough for the probes of the outage
            job = api.submit({"questions": QUESTIONS, "models": ["sim"], "max_attempts": 10})
            assert job["failover"] == "none"

            def succeeded(region: str) -> int:
                return int(api.job(job["id"])["counts"][region].get("succeeded", 0))

            wait_until(lambda: succeeded("doomed") >= 2, 30, what="doomed answering")
            killed_at = time.time()
            kill(doomed)
            assert refused(doomed.url)

            def dead_wait() -> dict[str, Any] | None:
                view = api.job(job["id"])
                wait = view["waiting"].get("doomed", {}).get("sim")
                return view if wait and wait["circuit"] != "closed" and wait["since"] else None

            view = wait_until(dead_wait, 30, what="the job to say doomed waits")
            wait = view["waiting"]["doomed"]["sim"]
            # The failed connection: refused, or reset (a kept-alive socket of the dead one).
            assert wait["last_error"]["code"] == "connection_error"
            assert FAILED_CONNECTION.search(wait["last_error"]["message"])
            assert doomed.url.removeprefix("http://") in wait["last_error"]["message"]
            assert wait["reason"].startswith("circuit ") and FAILED_CONNECTION.search(
                wait["reason"]
            )
            since = datetime.fromisoformat(wait["since"].replace("Z", "+00:00")).timestamp()
            assert since == pytest.approx(wait["since_at"], abs=0.001)
            assert killed_at - 1 <= wait["since_at"] <= time.time()
            assert wait["waited_s"] >= 0
            assert view["state"] == "running"
            assert view["eta_s"] is None and "doomed" in view["eta_unknown"]
            by_region = {r["region"]: r for r in view["regions"]}
            assert by_region["doomed"]["eta_s"] is None and by_region["doomed"]["eta_unknown"]

            # The live region finishes while doomed is down; the job still says why it waits.
            wait_until(
                lambda: succeeded("alive") == len(QUESTIONS), 60, what="alive to finish its share"
            )
            view = api.job(job["id"])
            assert view["state"] == "running" and view["eta_s"] is None
            assert "doomed" in view["waiting"] and "alive" not in view["waiting"]
            assert {r["region"]: r["eta_s"] for r in view["regions"]}["alive"] == 0.0
            executions = api.results(job["id"])["executions"]
            never_ran = [
                e
                for e in executions
                if e["requested_region"] == "doomed" and e["state"] == "queued"
            ]
            assert never_ran, "some of doomed's share never ran"
            for e in never_ran:
                assert e["attempt_log"] == []
                assert e["waiting_reason"].startswith("doomed/sim: circuit ")
                assert FAILED_CONNECTION.search(e["waiting_reason"])
            for e in executions:
                if e["requested_region"] == "alive":
                    assert e["state"] == "succeeded" and e["waiting_reason"] is None

            # Back on the same port: the next probe closes the circuit, the job finishes.
            doomed.start()
            done = wait_finished(api, job["id"], timeout=60)
            executions = api.results(job["id"])["executions"]

    assert done["states"] == {"succeeded": 2 * len(QUESTIONS)}
    assert done["waiting"] == {} and done["eta_s"] == 0.0 and done["eta_unknown"] is None
    for e in executions:
        assert e["executed_region"] == e["requested_region"]  # failover "none"
        assert e["waiting_reason"] is None
