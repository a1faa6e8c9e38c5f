"""Bad input through the real dispatcher's HTTP API: malformed JSON, unknown fields, wrong
types, oversized jobs, a missing key, another tenant's job id. Each gets the documented
JSON error, and the store is unchanged."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from dispatcher_harness import KEYS, DispatcherProcess, executor, wait_finished, write_regions

pytestmark = pytest.mark.slow

GOOD = {"questions": ["q1", "q2"], "models": ["sim"]}


class Running:
    def __init__(self, d: DispatcherProcess, db: Path) -> None:
        self.d = d
        self.db = db

    def post(self, body: Any, tenant: str | None = "alice", **headers: str) -> requests.Response:
        if tenant:
            headers["Authorization"] = f"Bearer {KEYS[tenant]}"
        data = body if isinstance(body, str | bytes) else json.dumps(body)
        headers.setdefault("Content-Type", "application/json")
        return requests.post(f"{self.d.url}/jobs", data=data, headers=headers, timeout=10)

    def rows(self) -> tuple[int, int]:
        with sqlite3.connect(self.db) as conn:
            return (
                conn.execute("SELECT count(*) FROM jobs").fetchone()[0],
                conn.execute("SELECT count(*) FROM executions").fetchone()[0],
            )


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    tmp = tmp_path_factory.mktemp("badinput")
    model = {"sim": {"provider": "simulated"}}
    with executor(tmp, "r1", model) as ex:
        regions = write_regions(tmp / "regions.toml", {"r1": (ex.url, 2, ["sim"])})
        env = {"ES_MAX_JOB_EXECUTIONS": "100", "ES_MAX_BODY_BYTES": "50000"}
        db = tmp / "d.db"
        with DispatcherProcess(tmp, f"sqlite:///{db}", regions, env) as d:
            yield Running(d, db)


@pytest.mark.parametrize(
    ("body", "status", "code", "field"),
    [
        ('{"questions": ["q1"], "models": [', 400, "invalid_json", None),
        ({**GOOD, "temperature": 0.5}, 422, "validation_error", "temperature"),
        ({**GOOD, "params": {"top_k": 3}}, 422, "validation_error", "params"),
        ({**GOOD, "max_attempts": "three"}, 422, "validation_error", "max_attempts"),
        ({**GOOD, "max_attempts": 0}, 422, "validation_error", "max_attempts"),
        ({**GOOD, "questions": [1, 2]}, 422, "validation_error", "questions"),
        ({**GOOD, "failover": True}, 422, "validation_error", "failover"),
        ({**GOOD, "models": "sim"}, 422, "validation_error", "models"),
        ({**GOOD, "models": ["gpt-9"]}, 422, "validation_error", "models"),
        ({**GOOD, "regions": ["atlantis"]}, 422, "validation_error", "regions"),
        ({"models": ["sim"]}, 422, "validation_error", "questions"),
        (
            {**GOOD, "questions": [f"q{i}" for i in range(101)]},
            422,
            "validation_error",
            "questions",
        ),
        ({**GOOD, "questions": ["x" * 60_000]}, 413, "payload_too_large", None),
    ],
)
def test_each_bad_request_gets_its_error_and_the_store_is_unchanged(
    running: Running, body: Any, status: int, code: str, field: str | None
) -> None:
    before = running.rows()
    r = running.post(body)
    assert r.status_code == status, r.text
    assert r.headers["Content-Type"].startswith("application/json")
    error = r.json()["error"]
    assert error["code"] == code and error["message"]
    if field is not None:
        assert field in error["details"], error
    assert running.rows() == before


def test_no_key_or_a_wrong_key_is_401(running: Running) -> None:
    before = running.rows()
    for headers in ({}, {"Authorization": "Bearer nope"}):
        r = running.post(GOOD, tenant=None, **headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    assert running.rows() == before


def test_another_tenants_job_is_404_and_untouched(running: Running) -> None:
    r = running.post(GOOD)
    assert r.status_code == 201
    job_id = r.json()["id"]
    bob = {"Authorization": f"Bearer {KEYS['bob']}"}
    base = f"{running.d.url}/jobs/{job_id}"
    for method, url in (("GET", base), ("GET", base + "/results"), ("POST", base + "/cancel")):
        resp = requests.request(method, url, headers=bob, timeout=10)
        assert resp.status_code == 404 and resp.json()["error"]["code"] == "not_found"
    job = wait_finished(running.d.api("alice"), job_id)
    assert job["cancelled"] is False and job["states"] == {"succeeded": 2}
