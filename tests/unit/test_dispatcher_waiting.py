"""A job waiting on a dead region says so (issue 10, item 5), stepped with a fake clock on
the in-memory store: GET /jobs/<id> names the region and model, since when and why
(the failure that opened the circuit), the ETA is unknown rather than a healthy-looking
number while a region the job needs is down under failover "none", and the executions
still queued there carry the reason; when the region is back, all of it goes away."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from executor_service.dispatcher.api import create_dispatcher_app
from executor_service.dispatcher.client import CallResult, Outcome
from executor_service.dispatcher.commands import waiting_detail
from executor_service.dispatcher.config import DispatcherSettings
from executor_service.dispatcher.regions import Regions
from executor_service.dispatcher.runtime import InlinePool, ManualWakeup
from executor_service.dispatcher.scheduler import (
    BackoffPolicy,
    CallVerdict,
    CircuitBreaker,
    CircuitChange,
    CircuitState,
    Jitter,
)
from executor_service.dispatcher.schemas import ResultsSchema
from executor_service.dispatcher.store.memory import MemoryStore
from executor_service.dispatcher.worker import Dispatcher, WorkerConfig

T0 = 1_800_000_000.0  # 2027-01-15T08:00:00Z
T0_ISO = "2027-01-15T08:00:00.000Z"
REGIONS = """
[regions.live]
url = "http://live"
concurrency = 1
models = ["m"]

[regions.dead]
url = "http://dead"
concurrency = 1
models = ["m"]
"""
ALICE = {"Authorization": "Bearer key-a"}
REFUSED = {
    "code": "connection_error",
    "message": "cannot reach http://dead/execute: [Errno 111] Connection refused",
}
CONFIG = WorkerConfig(
    lease_s=30.0,
    claim_poll_s=0.05,
    circuit_threshold=2,
    circuit_cooldown_s=10.0,
    retry_handoff_s=0.0,
    backoff=BackoffPolicy(1.0, 1.0, Jitter.NONE),
)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


class Caller:
    """A region's executor: answers, or (``down``) refuses every connection."""

    def __init__(self, down: bool = False) -> None:
        self.down = down

    def execute(self, model: str, prompt: str, request_id: str, params: Any) -> CallResult:
        if self.down:
            return CallResult(Outcome.RETRYABLE, error=dict(REFUSED))
        return CallResult(Outcome.SUCCESS, body={"output": f"answer to {prompt}", "usage": {}})

    def close(self) -> None:
        pass


class Env:
    def __init__(self, tmp: Path) -> None:
        path = tmp / "regions.toml"
        path.write_text(REGIONS)
        settings = DispatcherSettings.from_env(
            environ={
                "ES_REGIONS_FILE": str(path),
                "ES_DATABASE_URL": "memory://",
                "ES_API_KEYS": "alice:key-a",
            }
        )
        self.store, self.clock = MemoryStore(), Clock()
        self.callers = {"live": Caller(), "dead": Caller(down=True)}
        regions = Regions.load(path)
        self.dispatcher = Dispatcher(
            self.store,
            regions,
            CONFIG,
            clock=self.clock,
            client_factory=lambda r: self.callers[r.name],
            worker_id="stepper",
            pool_factory=lambda _r: InlinePool(),
            wakeup_factory=lambda _c: ManualWakeup(),
        )
        app = create_dispatcher_app(
            {"TESTING": True}, settings=settings, store=self.store, clock=self.clock
        )
        self.client: FlaskClient = app.test_client()

    def submit(self, n: int, failover: str = "none") -> str:
        body = {
            "questions": [f"q{i}" for i in range(n)],
            "models": ["m"],
            "failover": failover,
            "max_attempts": 10,
        }
        r = self.client.post("/jobs", json=body, headers=ALICE)
        assert r.status_code == 201, r.get_json()
        return str(r.get_json()["id"])

    def get(self, path: str) -> Any:
        r = self.client.get(path, headers=ALICE)
        assert r.status_code == 200, r.get_json()
        return r.get_json()

    def step(self, turns: int, dt: float = 1.0) -> None:
        for _ in range(turns):
            self.dispatcher.step()
            self.clock.now += dt


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    yield e
    e.store.close()


def test_a_job_waiting_on_a_dead_region_says_which_since_when_and_why(env: Env) -> None:
    job_id = env.submit(4)
    env.step(1, dt=0.5)  # q0 in each region: live answers, dead fails once (threshold 2)
    env.step(1, dt=0.5)  # q1 (q0's retry is not due yet) fails in dead: its circuit opens
    opened_at = T0 + 0.5
    env.step(6)  # live answers the rest; dead claims nothing in its cool-down
    job = env.get(f"/jobs/{job_id}")

    wait = job["waiting"]["dead"]["m"]
    assert wait["circuit"] == "open"
    assert wait["since_at"] == opened_at and wait["since"] == "2027-01-15T08:00:00.500Z"
    assert wait["waited_s"] == pytest.approx(env.clock.now - opened_at)
    assert wait["last_error"] == REFUSED
    assert "Connection refused" in wait["reason"] and wait["reason"].startswith("circuit open")
    assert "live" not in job["waiting"]
    # The job cannot finish while dead is down: no ETA "as if healthy", and why.
    regions = {r["region"]: r for r in job["regions"]}
    assert regions["live"]["in_progress"] == 0 and regions["live"]["eta_s"] == 0.0
    assert regions["dead"]["eta_s"] is None and job["eta_s"] is None
    assert job["eta_unknown"] == regions["dead"]["eta_unknown"]
    assert job["eta_unknown"].startswith("waiting on dead (m: circuit open since ")
    assert job["state"] == "running"
    # The follow bars show the same reason.
    assert waiting_detail(job["waiting"]["dead"]).startswith("m: circuit open since " + T0_ISO[:17])

    # The executions that never ran carry the reason; the one that ran carries its error.
    results = env.get(f"/jobs/{job_id}/results")["executions"]
    dead = {e["question_index"]: e for e in results if e["requested_region"] == "dead"}
    assert all(e["state"] == "succeeded" for e in results if e["requested_region"] == "live")
    for q in (2, 3):
        assert dead[q]["state"] == "queued" and dead[q]["attempt_log"] == []
        assert dead[q]["waiting_reason"] == f"dead/m: {wait['reason']}"
    for q in (0, 1):  # failover none: their retries wait for dead too
        assert dead[q]["state"] == "retry_wait" and dead[q]["waiting_reason"]
        assert dead[q]["last_error"]["code"] == "connection_error"
    lines = env.client.get(f"/jobs/{job_id}/results?format=jsonl", headers=ALICE).get_data(True)
    assert lines.count('"waiting_reason":"dead/m: circuit open since') == 4
    # The JSON page is what its schema says, exactly (it is not dumped through it).
    page = env.get(f"/jobs/{job_id}/results")
    assert ResultsSchema().dump(page) == page

    # The region comes back: the probe after the cool-down closes the circuit.
    env.callers["dead"].down = False
    env.step(20)
    job = env.get(f"/jobs/{job_id}")
    assert job["state"] == "finished" and job["waiting"] == {}
    assert job["eta_s"] == 0.0 and job["eta_unknown"] is None
    results = env.get(f"/jobs/{job_id}/results")["executions"]
    assert all(e["waiting_reason"] is None for e in results)


def test_a_failed_probe_keeps_since_and_the_latest_error(env: Env) -> None:
    job_id = env.submit(3)
    env.step(2, dt=0.5)  # open at T0 + 0.5 (the second failure)
    env.callers["dead"].execute = lambda *a: CallResult(  # type: ignore[method-assign]
        Outcome.RETRYABLE, error={"code": "timeout", "message": "no answer from http://dead"}
    )
    env.step(12)  # past the cool-down: the probe fails, the circuit opens again
    wait = env.get(f"/jobs/{job_id}")["waiting"]["dead"]["m"]
    assert wait["since_at"] == T0 + 0.5
    assert wait["last_error"] == {"code": "timeout", "message": "no answer from http://dead"}
    assert wait["circuit_open_until"] > T0 + 10.5  # a new cool-down from the probe


def test_under_failover_any_the_eta_stays_a_number(env: Env) -> None:
    job_id = env.submit(4, failover="any")
    env.step(3, dt=0.5)  # dead's circuit opens; its queued work is handed to live
    job = env.get(f"/jobs/{job_id}")
    assert job["state"] == "running" and job["waiting"]["dead"]["m"]["circuit"] == "open"
    assert job["eta_s"] is not None and job["eta_unknown"] is None
    results = env.get(f"/jobs/{job_id}/results")["executions"]
    assert not any(e["waiting_reason"] for e in results if e["state"] == "retry_wait")


def test_the_breaker_knows_when_the_outage_began() -> None:
    now = [100.0]
    changes: list[CircuitChange] = []
    breaker = CircuitBreaker(2, 5.0, lambda: now[0], changes.append)
    breaker.record(CallVerdict.UNHEALTHY, {"code": "a", "message": "first", "status": 503})
    now[0] = 101.0
    breaker.record(CallVerdict.UNHEALTHY, {"code": "b", "message": "second"})
    assert changes[-1] == CircuitChange(
        CircuitState.OPEN, 106.0, 101.0, {"code": "b", "message": "second"}
    )
    now[0] = 106.0
    assert breaker.allowance(1) == 1  # half-open: since and error carried along
    assert changes[-1] == CircuitChange(
        CircuitState.HALF_OPEN, None, 101.0, {"code": "b", "message": "second"}
    )
    breaker.record(CallVerdict.HEALTHY)
    assert changes[-1] == CircuitChange(CircuitState.CLOSED, None)
    breaker.record(CallVerdict.UNHEALTHY)
    now[0] = 200.0
    breaker.record(CallVerdict.UNHEALTHY)  # a new outage: a new since, no stale error
    assert changes[-1] == CircuitChange(CircuitState.OPEN, 205.0, 200.0, None)


def test_results_pages_follow_an_opaque_keyset_cursor(env: Env) -> None:
    job_id = env.submit(7)
    env.step(3)
    everything = env.get(f"/jobs/{job_id}/results?limit=100")
    assert everything["next_cursor"] is None and len(everything["executions"]) == 14
    seen, cursor, pages = [], None, 0
    while True:
        page = env.get(f"/jobs/{job_id}/results?limit=3" + (f"&cursor={cursor}" if cursor else ""))
        assert ResultsSchema().dump(page) == page
        seen += page["executions"]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
        assert not cursor.isdigit()  # opaque: a key, not an offset
    assert pages == 5 and seen == everything["executions"]  # same order, nothing twice
    for cursor in ("12", "not-ours", "W10", "WzEsMiwzXQ", "WzEsMiwzLDRd"):
        r = env.client.get(f"/jobs/{job_id}/results?cursor={cursor}", headers=ALICE)
        assert r.status_code == 422 and "cursor" in r.get_json()["error"]["details"]
