"""Hedged calls end to end: real gunicorn executors, the real dispatcher command, SQLite.

One call of a job is a straggler on purpose (the simulated model's ``tail_request_id``:
execution 40's first call takes 8 s; every other call 0.2 s). With ES_HEDGE on, the
dispatcher sends a second copy once that call has run past the model's observed p95 and
the job is in its tail, in the other region (failover "any"): the job finishes long
before the straggler would have, the attempt log shows the hedge and, once the
straggler ends, its ignored answer; every execution has exactly one result, every call
its own request id, and no executor ever runs more calls than its region's concurrency.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from dispatcher_harness import (
    DispatcherProcess,
    calls_by_request_id,
    executor,
    wait_finished,
    write_regions,
)
from support import wait_until
from test_chaos import InFlightSampler

pytestmark = pytest.mark.slow

QUESTIONS = 40  # a budget of 2 hedges (5%); 39 answers make r1's p95 before the last call
STRAGGLER_S = 8.0
CONCURRENCY = 2


def test_a_straggler_is_hedged_and_the_job_does_not_wait_for_it(tmp_path: Path) -> None:
    model = {
        "sim": {
            "provider": "simulated",
            "latency_s": 0.2,
            "tail_latency_s": STRAGGLER_S,
            "tail_request_id": f"[.]{QUESTIONS}[.]1$",  # the last execution's first call
        }
    }
    spare = {"GUNICORN_WORKER_CLASS": "gthread", "GUNICORN_THREADS": "8"}
    with executor(tmp_path, "r1", model) as e1, executor(tmp_path, "r2", model) as e2:
        for ex in (e1, e2):  # spare threads: an overfilled region is seen, not refused
            ex.stop()
            ex.env.update(spare)
            ex.start()
        executors = {"r1": e1, "r2": e2}
        regions = write_regions(
            tmp_path / "regions.toml",
            {name: (ex.url, CONCURRENCY, ["sim"]) for name, ex in executors.items()},
        )
        env = {"ES_HEDGE": "true"}
        database = f"sqlite:///{tmp_path / 'd.db'}"  # fresh: execution ids 1..40
        with (
            InFlightSampler(executors) as sampler,
            DispatcherProcess(tmp_path, database, regions, env) as dispatcher,
        ):
            api = dispatcher.api()
            submitted = time.time()
            job = api.submit(
                {
                    "questions": [f"q{i}" for i in range(QUESTIONS)],
                    "models": ["sim"],
                    "regions": ["r1"],
                    "failover": "any",
                }
            )
            wait_finished(api, job["id"], timeout=60)
            finished = time.time()
            executions = api.results(job["id"])["executions"]
            # The straggler goes on at r1; once it ends its answer is logged, not used.
            straggler = next(e for e in executions if e["id"] == QUESTIONS)
            wait_until(
                lambda: (
                    len(
                        next(
                            e for e in api.results(job["id"])["executions"] if e["id"] == QUESTIONS
                        )["attempt_log"]
                    )
                    == 2
                ),
                STRAGGLER_S + 10,
                interval=0.1,
                what="the straggler's end in the attempt log",
            )
            after = api.results(job["id"])["executions"]
        calls = calls_by_request_id(e1, e2)

    assert finished - submitted < STRAGGLER_S, "the job waited for its straggler"
    assert all(e["state"] == "succeeded" for e in executions)
    assert all([a["ok"] for a in e["attempt_log"]].count(True) == 1 for e in after)
    # The hedge: call 2 of the straggling execution, in r2, answered first.
    assert (straggler["executed_region"], straggler["hedges"]) == ("r2", 1)
    assert straggler["output"] == "simulated answer to: q39"
    (ended,) = [e for e in after if e["id"] == QUESTIONS]
    log = [(a["number"], a["region"], a["ok"], (a["error"] or {}).get("code")) for a in ended[
        "attempt_log"
    ]]  # fmt: skip
    assert log == [(1, "r1", False, "hedged"), (2, "r2", True, None)]
    # Every call once, each with its own request id: 40 first calls and one hedge.
    assert set(calls.values()) == {1}
    assert sum(calls.values()) == QUESTIONS + 1
    assert (f"{job['id']}.{QUESTIONS}.2", 200) in calls
    assert sum(e["hedges"] for e in after) == 1
    assert all(v <= CONCURRENCY for v in sampler.highest.values()), sampler.highest
    assert sampler.samples > 0
