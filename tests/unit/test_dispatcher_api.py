"""The dispatcher API through Flask's test client, on the in-memory store (its state
inspected directly)."""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dispatcher_app import ALICE, BOB, DispatcherApp

from executor_service.dispatcher.rules import ClaimRequest

REGIONS_TOML = """
[regions.us]
url = "http://127.0.0.1:9"
concurrency = 2
models = ["m1", "m2"]

[regions.eu]
url = "http://127.0.0.1:9"
concurrency = 2
models = ["m1"]
"""


class Env(DispatcherApp):
    def __init__(self, tmp: Path) -> None:
        super().__init__(
            tmp, REGIONS_TOML, {"ES_MAX_JOB_EXECUTIONS": "50", "ES_MAX_BODY_BYTES": "20000"}
        )

    def rows(self) -> tuple[int, int]:
        """(jobs, executions) in the store: what a refused request must not change."""
        return len(self.store.jobs), len(self.store.rows)

    def submit(self, body: dict[str, Any], headers: dict[str, str] | None = None) -> Any:
        return self.client.post("/jobs", json=body, headers={**ALICE, **(headers or {})})


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    yield e
    e.store.close()


JOB = {"questions": ["q1", "q2"], "models": ["m1"]}


def test_submit_and_read_a_job(env: Env) -> None:
    r = env.submit(JOB)
    assert r.status_code == 201
    job = r.get_json()
    assert r.headers["Location"] == f"/jobs/{job['id']}"
    assert job["tenant"] == "alice" and job["total"] == 4 and job["state"] == "queued"
    assert job["regions_by_model"] == {"m1": ["us", "eu"]}
    assert job["counts"] == {"us": {"queued": 2}, "eu": {"queued": 2}}
    assert job["progress"] == {
        "total": 4,
        "succeeded": 0,
        "dead": 0,
        "cancelled": 0,
        "in_progress": 4,
        "done": 0,
        "fraction": 0.0,
        "finished_fraction": 0.0,
    }
    assert job["eta_s"] is None
    again = env.client.get(f"/jobs/{job['id']}", headers=ALICE)
    assert again.status_code == 200 and again.get_json()["id"] == job["id"]


def test_submit_works_with_info_logging_on(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    # production logs at INFO: a log call with a reserved LogRecord key broke POST /jobs
    caplog.set_level(logging.INFO, logger="executor_service")
    r = env.submit(JOB)
    assert r.status_code == 201
    assert any(rec.getMessage() == "job submitted" for rec in caplog.records)


def test_idempotency_key_same_body_same_job_other_body_409(env: Env) -> None:
    first = env.submit(JOB, {"Idempotency-Key": "k-1"})
    assert first.status_code == 201
    same = env.submit(JOB, {"Idempotency-Key": "k-1"})
    assert same.status_code == 200 and same.get_json()["id"] == first.get_json()["id"]
    in_body = env.submit({**JOB, "idempotency_key": "k-1"})
    assert in_body.status_code == 200 and in_body.get_json()["id"] == first.get_json()["id"]
    other = env.submit({**JOB, "questions": ["different"]}, {"Idempotency-Key": "k-1"})
    assert other.status_code == 409 and other.get_json()["error"]["code"] == "conflict"
    assert env.rows() == (1, 4)
    # keys are per tenant: bob's k-1 is a new job
    bob = env.client.post("/jobs", json=JOB, headers={**BOB, "Idempotency-Key": "k-1"})
    assert bob.status_code == 201 and bob.get_json()["id"] != first.get_json()["id"]


@pytest.mark.parametrize(
    ("body", "status", "code", "field"),
    [
        ("{not json", 400, "invalid_json", None),
        (json.dumps({**JOB, "colour": "red"}), 422, "validation_error", "colour"),
        (json.dumps({**JOB, "max_attempts": "3"}), 422, "validation_error", "max_attempts"),
        (json.dumps({**JOB, "questions": "q1"}), 422, "validation_error", "questions"),
        (json.dumps({**JOB, "priority": 1.5}), 422, "validation_error", "priority"),
        (json.dumps({**JOB, "questions": []}), 422, "validation_error", "questions"),
        (json.dumps({**JOB, "models": ["nope"]}), 422, "validation_error", "models"),
        (json.dumps({**JOB, "regions": ["mars"]}), 422, "validation_error", "regions"),
        (
            json.dumps({**JOB, "models": ["m2"], "regions": ["eu"]}),
            422,
            "validation_error",
            "regions",
        ),
        (
            json.dumps({**JOB, "questions": [f"q{i}" for i in range(26)]}),
            422,
            "validation_error",
            "questions",
        ),
        (json.dumps({**JOB, "questions": ["x" * 21000]}), 413, "payload_too_large", None),
        (json.dumps([JOB]), 422, "validation_error", None),
    ],
)
def test_bad_requests_get_the_documented_error_and_change_nothing(
    env: Env, body: str, status: int, code: str, field: str | None
) -> None:
    r = env.client.post("/jobs", data=body, headers={**ALICE, "Content-Type": "application/json"})
    assert r.status_code == status, r.get_json()
    error = r.get_json()["error"]
    assert error["code"] == code and error["message"]
    if field is not None:
        assert field in error["details"]
    assert env.rows() == (0, 0)


def test_tenants_see_only_their_own_jobs(env: Env) -> None:
    job_id = env.submit(JOB).get_json()["id"]
    for method, path in [
        ("get", f"/jobs/{job_id}"),
        ("get", f"/jobs/{job_id}/results"),
        ("post", f"/jobs/{job_id}/cancel"),
    ]:
        r = getattr(env.client, method)(path, headers=BOB)
        assert r.status_code == 404 and r.get_json()["error"]["code"] == "not_found"
        # exactly what an id that does not exist gets: nothing reveals the job exists
        missing = getattr(env.client, method)(path.replace(job_id, "f" * 32), headers=ALICE)
        assert missing.status_code == 404
        assert (
            missing.get_json()["error"]["message"].replace("f" * 32, job_id)
            == (r.get_json()["error"]["message"])
        )
    assert env.client.get(f"/jobs/{job_id}").status_code == 401
    # bob's cancel did nothing
    assert env.client.get(f"/jobs/{job_id}", headers=ALICE).get_json()["states"] == {"queued": 4}


def _run_some(env: Env) -> None:
    """Play the worker: one execution succeeds, one is dead-lettered, one waits to retry."""
    spec = env.regions["us"].spec()
    claims = env.store.claim(ClaimRequest(spec, 2, env.clock.now, 30, "w", 20))
    body = {
        "output": "answer one",
        "finish_reason": "stop",
        "usage": {"prompt_tokens": 1, "completion_tokens": 2},
        "timing": {"queue_ms": 0.1, "model_ms": 5.0, "total_ms": 5.5},
        "region": "us",
        "replica": "r1",
    }
    env.store.complete(
        claims[0].execution_id, claims[0].token, body, env.clock.now + 1, env.clock.now
    )
    dead = {"code": "unknown_model", "message": "no such model", "status": 404}
    env.store.fail(
        claims[1].execution_id, claims[1].token, dead, env.clock.now + 1, env.clock.now, None
    )
    busy = {"code": "overloaded", "message": "busy", "status": 503}
    claims = env.store.claim(
        ClaimRequest(spec, 1, env.clock.now, 30, "w", 20)
    )  # 2 slots: claim again
    env.store.fail(
        claims[0].execution_id,
        claims[0].token,
        busy,
        env.clock.now + 1,
        env.clock.now,
        env.clock.now + 5,
    )


def test_results_json_and_csv_and_eta(env: Env) -> None:
    job_id = env.submit(
        {**JOB, "questions": ["q1", "q2", "q3"], "models": ["m1"], "regions": ["us"]}
    ).get_json()["id"]
    _run_some(env)
    env.clock.now += 10  # 2 of 3 final after 10 s: 5 s per execution, 1 left
    job = env.client.get(f"/jobs/{job_id}", headers=ALICE).get_json()
    assert job["state"] == "running"
    assert job["counts"] == {"us": {"succeeded": 1, "dead": 1, "retry_wait": 1}}
    assert job["progress"]["done"] == 2 and job["eta_s"] == pytest.approx(5.0)

    results = env.client.get(f"/jobs/{job_id}/results", headers=ALICE).get_json()
    by_state = {e["state"]: e for e in results["executions"]}
    ok = by_state["succeeded"]
    assert ok["output"] == "answer one" and ok["executed_region"] == "us"
    assert ok["requested_region"] == "us" and ok["finish_reason"] == "stop"
    assert ok["timing"]["model_ms"] == 5.0 and ok["attempt_log"][0]["duration_ms"] == 1000.0
    dead = by_state["dead"]
    assert dead["output"] is None and dead["last_error"]["code"] == "unknown_model"
    assert dead["attempt_log"][0]["error"]["message"] == "no such model"
    assert by_state["retry_wait"]["attempt_log"][0]["error"]["code"] == "overloaded"

    for kwargs in ({"query_string": {"format": "csv"}}, {"headers": {"Accept": "text/csv"}}):
        headers = {**ALICE, **kwargs.pop("headers", {})}
        r = env.client.get(f"/jobs/{job_id}/results", headers=headers, **kwargs)
        assert r.status_code == 200 and r.mimetype == "text/csv"
        rows = list(csv.DictReader(io.StringIO(r.get_data(as_text=True))))
        assert len(rows) == 3
        assert {row["state"] for row in rows} == {"succeeded", "dead", "retry_wait"}
        dead_row = next(row for row in rows if row["state"] == "dead")
        assert "#1 us: unknown_model: no such model" in dead_row["errors"]
    bad = env.client.get(f"/jobs/{job_id}/results?format=xml", headers=ALICE)
    assert bad.status_code == 422


def test_cancel_stops_what_has_not_started(env: Env) -> None:
    job_id = env.submit(JOB).get_json()["id"]
    r = env.client.post(f"/jobs/{job_id}/cancel", headers=ALICE)
    assert r.status_code == 200
    assert r.get_json() == {"job_id": job_id, "cancelled": 4, "state": "cancelled"}
    job = env.client.get(f"/jobs/{job_id}", headers=ALICE).get_json()
    assert job["states"] == {"cancelled": 4} and job["cancelled"] is True
    assert env.client.post(f"/jobs/{job_id}/cancel", headers=ALICE).get_json()["cancelled"] == 0


def test_queue_and_metrics_show_the_queues(env: Env) -> None:
    env.submit({"questions": ["a", "b", "c"], "models": ["m1", "m2"]})
    queue = env.client.get("/queue", headers=ALICE).get_json()
    by_region = {q["region"]: q for q in queue["regions"]}
    assert by_region["us"]["queued"] == 6 and by_region["eu"]["queued"] == 3
    assert by_region["us"]["concurrency"] == 2 and by_region["us"]["circuit"] == "closed"
    assert queue["global_retry"] == 0 and queue["dead"] == 0
    text = env.client.get("/metrics", headers=ALICE).get_data(as_text=True)
    assert 'dispatcher_queue_depth{queue="queued",region="us"} 6.0' in text
    assert 'dispatcher_queue_depth{queue="queued",region="eu"} 3.0' in text


def test_openapi_documents_the_routes_and_schemas(env: Env) -> None:
    spec = env.client.get("/openapi.json", headers=ALICE).get_json()
    assert {
        "/jobs",
        "/jobs/{job_id}",
        "/jobs/{job_id}/results",
        "/jobs/{job_id}/cancel",
        "/queue",
    } <= set(spec["paths"])
    post = spec["paths"]["/jobs"]["post"]
    assert {"200", "201", "409", "422"} <= set(post["responses"])
    schema = spec["components"]["schemas"]["JobRequest"]
    assert {
        "questions",
        "models",
        "regions",
        "failover",
        "max_attempts",
        "priority",
        "idempotency_key",
        "params",
    } <= set(schema["properties"])


def test_csv_cells_cannot_be_spreadsheet_formulas(env: Env) -> None:
    questions = ['=HYPERLINK("http://evil.example","x")', "+1+1", "-2+3", "@SUM(A1)", "fine"]
    job_id = env.submit({"questions": questions, "models": ["m1"], "regions": ["us"]}).get_json()[
        "id"
    ]
    r = env.client.get(f"/jobs/{job_id}/results?format=csv", headers=ALICE)
    rows = list(csv.DictReader(io.StringIO(r.get_data(as_text=True))))
    cells = sorted(row["question"] for row in rows)
    assert cells == sorted(["'" + q for q in questions[:4]] + ["fine"])
    # the JSON keeps the questions as they were asked
    results = env.client.get(f"/jobs/{job_id}/results", headers=ALICE).get_json()
    assert sorted(e["question"] for e in results["executions"]) == sorted(questions)
