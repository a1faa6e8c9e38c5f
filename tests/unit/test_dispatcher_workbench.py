"""The workbench's API through Flask's test client on the memory store: the new job
fields, listing, retry, the comparison, exports, paginated results and the pages."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dispatcher_app import ALICE, BOB, DispatcherApp

from executor_service.dispatcher.rules import ClaimRequest

REGIONS_TOML = """
[regions.us]
url = "http://127.0.0.1:9"
concurrency = 50
models = ["m1", "m2"]
prices = { m1 = { prompt = 1.0, completion = 2.0 } }

[regions.eu]
url = "http://127.0.0.1:9"
concurrency = 50
models = ["m1"]
"""
T0 = 1_750_000_000.0


class Env(DispatcherApp):
    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp, REGIONS_TOML, now=T0)

    def submit(self, body: dict[str, Any], headers: dict[str, str] = ALICE) -> Any:
        return self.client.post("/jobs", json=body, headers=headers)

    def get(self, path: str, headers: dict[str, str] = ALICE, **kw: Any) -> Any:
        return self.client.get(path, headers=headers, **kw)

    def run(self, region: str, answer: Any) -> int:
        """Play the worker for ``region``: claim all it can; ``answer(claim)`` gives the
        output to complete with, or None to dead-letter the call. Returns calls made."""
        spec = self.regions[region].spec()
        claims = self.store.claim(ClaimRequest(spec, 100, self.clock.now, 30, "w", 100))
        for c in claims:
            output = answer(c)
            if output is None:
                error = {"code": "connection_error", "message": f"{region} is down"}
                self.store.fail(
                    c.execution_id, c.token, error, self.clock.now, self.clock.now, None
                )
            else:
                body = {
                    "output": output,
                    "finish_reason": "stop",
                    "usage": {"prompt_tokens": 10, "completion_tokens": 20},
                    "timing": {"model_ms": 5.0, "total_ms": 6.0},
                }
                self.store.complete(
                    c.execution_id, c.token, body, self.clock.now + 1, self.clock.now
                )
        return len(claims)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    yield Env(tmp_path)


def test_failover_is_none_unless_asked_and_documented_so(env: Env) -> None:
    job = env.submit({"questions": ["q"], "models": ["m1"]}).get_json()
    assert job["failover"] == "none"
    assert (
        env.submit({"questions": ["q"], "models": ["m1"], "failover": "any"}).get_json()["failover"]
        == "any"
    )
    spec = env.get("/openapi.json").get_json()
    failover = spec["components"]["schemas"]["JobRequest"]["properties"]["failover"]
    assert failover["default"] == "none"
    for path in ("/jobs", "/jobs/{job_id}/retry", "/jobs/{job_id}/compare"):
        assert path in spec["paths"]
    assert "get" in spec["paths"]["/jobs"] and "post" in spec["paths"]["/jobs"]


def test_chat_messages_system_prompts_samples_name_and_tags(env: Env) -> None:
    r = env.submit(
        {
            "name": "censorship probe",
            "tags": ["probe", "2026-12"],
            "system": "Answer in one sentence.",
            "messages": [
                {"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "4."},
            ],
            "questions": [
                "What happened in 1989?",
                {"text": "Who governs Taiwan?", "system": "You are a historian."},
                {"messages": [{"role": "user", "content": "Say hi"}]},
            ],
            "models": ["m1"],
            "regions": ["us", "eu"],
            "samples": 2,
            "params": {"temperature": 0.7, "seed": 5},
        }
    )
    assert r.status_code == 201, r.get_json()
    job = r.get_json()
    assert (job["name"], job["tags"], job["samples"]) == (
        "censorship probe",
        ["probe", "2026-12"],
        2,
    )
    assert job["total"] == 3 * 2 * 2
    runs = env.get(f"/jobs/{job['id']}/results").get_json()["executions"]
    assert sorted({e["sample"] for e in runs}) == [0, 1]
    first = next(e for e in runs if e["question_index"] == 0)
    assert first["question"] == "What happened in 1989?"
    assert first["messages"] == [
        {"role": "system", "content": "Answer in one sentence."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "What happened in 1989?"},
    ]
    second = next(e for e in runs if e["question_index"] == 1)
    assert second["messages"][0] == {"role": "system", "content": "You are a historian."}
    third = next(e for e in runs if e["question_index"] == 2)
    assert third["question"] == "Say hi" and third["messages"][-1]["content"] == "Say hi"
    # the worker gets the messages, and seed + sample
    claims = env.store.claim(ClaimRequest(env.regions["us"].spec(), 100, T0, 30, "w", 100))
    from executor_service.dispatcher.jobs import call_params

    seeds = {c.sample: call_params(c)["seed"] for c in claims}
    assert seeds == {0: 5, 1: 6}


def test_plain_questions_are_sent_as_a_prompt(env: Env) -> None:
    job = env.submit({"questions": ["plain?"], "models": ["m1"], "regions": ["us"]}).get_json()
    (e,) = env.get(f"/jobs/{job['id']}/results").get_json()["executions"]
    assert e["messages"] is None and e["sample"] == 0


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"questions": ["q"], "models": ["m1"], "samples": 3}, "samples"),
        ({"questions": ["q"], "models": ["m1"], "samples": 0}, "samples"),
        ({"questions": [{"text": "a", "messages": []}], "models": ["m1"]}, "questions"),
        ({"questions": [{"system": "s"}], "models": ["m1"]}, "questions"),
        (
            {"questions": [{"messages": [{"role": "god", "content": "x"}]}], "models": ["m1"]},
            "questions",
        ),
        ({"questions": [7], "models": ["m1"]}, "questions"),
        ({"questions": ["q"], "models": ["m1"], "tags": ["x" * 65]}, "tags"),
        ({"questions": ["q"], "models": ["m1"], "name": ""}, "name"),
    ],
)
def test_bad_new_fields_are_422_naming_the_field(env: Env, body: dict, field: str) -> None:
    r = env.submit(body)
    assert r.status_code == 422
    error = r.get_json()["error"]
    assert error["code"] == "validation_error"
    assert any(field in key for key in json.dumps(error["details"]).split('"')), error


def test_progress_does_not_count_dead_cells_as_done(env: Env) -> None:
    job = env.submit({"questions": ["a", "b"], "models": ["m1"]}).get_json()
    env.run("us", lambda c: "yes")
    env.run("eu", lambda c: None)
    view = env.get(f"/jobs/{job['id']}").get_json()
    assert view["state"] == "finished"
    p = view["progress"]
    assert (p["succeeded"], p["dead"], p["cancelled"], p["in_progress"]) == (2, 2, 0, 0)
    assert p["fraction"] == 0.5 and p["finished_fraction"] == 1.0
    by_region = {r["region"]: r for r in view["regions"]}
    assert by_region["eu"]["fraction"] == 0.0 and by_region["eu"]["dead"] == 2
    assert by_region["us"]["fraction"] == 1.0 and by_region["us"]["eta_s"] == 0.0
    assert view["view_url"] == f"/jobs/{job['id']}/view"


def test_list_jobs_newest_first_with_a_cursor_and_filters(env: Env) -> None:
    ids = []
    for i in range(5):
        env.clock.now = T0 + i
        body = {
            "questions": ["q"],
            "models": ["m2"],
            "name": f"run {i}" + (" bias" if i % 2 else ""),
        }
        ids.append(env.submit(body).get_json()["id"])
    env.submit({"questions": ["q"], "models": ["m2"], "name": "bob's"}, headers=BOB)
    env.run("us", lambda c: "ok" if c.job_id == ids[4] else None)

    page = env.get("/jobs?limit=2").get_json()
    assert [j["id"] for j in page["jobs"]] == [ids[4], ids[3]]
    seen = [j["id"] for j in page["jobs"]]
    while page["next_cursor"]:
        page = env.get(f"/jobs?limit=2&cursor={page['next_cursor']}").get_json()
        seen += [j["id"] for j in page["jobs"]]
    assert seen == ids[::-1]  # bob's job never appears
    assert [j["id"] for j in env.get("/jobs?name=BIAS").get_json()["jobs"]] == [ids[3], ids[1]]
    finished = env.get("/jobs?state=finished").get_json()["jobs"]
    assert len(finished) == 5 and finished[0]["progress"]["succeeded"] == 1
    assert env.get("/jobs?state=running").get_json()["jobs"] == []
    assert env.get("/jobs?state=bogus").status_code == 422
    assert env.get("/jobs?cursor=not-ours").get_json()["error"]["details"]["cursor"]
    assert env.client.get("/jobs").status_code == 401


def test_retry_requeues_dead_cells_in_their_region_and_the_job_runs_again(env: Env) -> None:
    job = env.submit({"questions": ["a", "b"], "models": ["m1"], "max_attempts": 2}).get_json()
    env.run("us", lambda c: "yes")
    env.run("eu", lambda c: None)
    job_id = job["id"]

    assert env.client.post(f"/jobs/{job_id}/retry", json={}, headers=BOB).status_code == 404
    bad = env.client.post(f"/jobs/{job_id}/retry", json={"regions": ["mars"]}, headers=ALICE)
    assert bad.status_code == 422 and "regions" in bad.get_json()["error"]["details"]
    r = env.client.post(f"/jobs/{job_id}/retry", json={"regions": ["eu"]}, headers=ALICE)
    assert r.status_code == 200
    assert r.get_json()["requeued"] == 2 and r.get_json()["state"] == "running"
    runs = env.get(f"/jobs/{job_id}/results").get_json()["executions"]
    eu = [e for e in runs if e["requested_region"] == "eu"]
    assert {e["state"] for e in eu} == {"queued"}
    assert all(e["attempts"] == 0 and e["attempts_total"] == 1 for e in eu)
    assert all(e["attempt_log"][0]["error"]["code"] == "connection_error" for e in eu)

    assert env.run("us", lambda c: "stolen") == 0  # kept in its requested region
    env.run("eu", lambda c: "yes")
    view = env.get(f"/jobs/{job_id}").get_json()
    assert view["progress"]["fraction"] == 1.0 and view["state"] == "finished"
    # nothing left to retry; no body at all is fine too
    again = env.client.post(f"/jobs/{job_id}/retry", headers=ALICE)
    assert again.status_code == 200 and again.get_json()["requeued"] == 0


def test_compare_marks_differing_answers_refusals_and_usage(env: Env) -> None:
    job = env.submit({"questions": ["capital?", "1989?"], "models": ["m1"]}).get_json()
    env.run("us", lambda c: "Paris" if c.question_index == 0 else "Tiananmen Square protests")
    env.run("eu", lambda c: "paris" if c.question_index == 0 else "")
    grid = env.get(f"/jobs/{job['id']}/compare").get_json()
    (model,) = grid["models"]
    assert model["model"] == "m1" and model["regions"] == ["us", "eu"]
    same, censored = model["rows"]
    assert same["exact_match"] and not same["differs"] and same["similarity"] == 1.0
    assert censored["differs"] and censored["refusals"] == ["eu"]
    assert censored["cells"]["eu"]["refusal"] == "empty answer"
    usage = grid["usage"]
    assert usage["job"]["prompt_tokens"] == 40 and usage["job"]["cost_usd"] is None
    assert usage["by_region"]["us"]["cost_usd"] == pytest.approx(2 * (10 + 40) / 1e6)
    assert env.get(f"/jobs/{job['id']}/compare", headers=BOB).status_code == 404


def test_exports_carry_every_field_with_iso_times(env: Env) -> None:
    body = {"questions": ["q1", {"text": "q2", "system": "terse"}], "models": ["m1"]}
    job = env.submit({**body, "regions": ["us"]}).get_json()
    env.run("us", lambda c: 'a, "quoted"\nanswer')
    lines = env.get(f"/jobs/{job['id']}/results?format=jsonl").get_data(as_text=True).splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 2
    first = records[0]
    for key in (
        "question",
        "messages",
        "model",
        "requested_region",
        "executed_region",
        "sample",
        "state",
        "attempts",
        "output",
        "finish_reason",
        "usage",
    ):
        assert key in first
    assert first["job_id"] == job["id"] and first["attempts_total"] == 1
    assert first["created_at"] == "2025-06-15T15:06:40.000Z"
    assert first["finished_at"].endswith("Z") and first["attempt_log"][0]["started_at"].endswith(
        "Z"
    )
    assert records[1]["messages"][0] == {"role": "system", "content": "terse"}

    r = env.get(f"/jobs/{job['id']}/results", headers={**ALICE, "Accept": "text/csv"})
    rows = list(csv.DictReader(io.StringIO(r.get_data(as_text=True))))
    assert list(rows[0]) == list(first)  # the same columns
    assert rows[0]["output"] == 'a, "quoted"\nanswer' and rows[0]["prompt_tokens"] == "10"
    assert json.loads(rows[1]["messages"])[0]["content"] == "terse"
    assert rows[0]["created_at"] == first["created_at"]


def test_results_are_paginated(env: Env) -> None:
    job = env.submit({"questions": [f"q{i}" for i in range(5)], "models": ["m1"]}).get_json()
    first = env.get(f"/jobs/{job['id']}/results?limit=4").get_json()
    assert len(first["executions"]) == 4 and first["total"] == 10 and first["next_cursor"]
    ids = [e["id"] for e in first["executions"]]
    page = first
    while page["next_cursor"]:
        page = env.get(f"/jobs/{job['id']}/results?limit=4&cursor={page['next_cursor']}").get_json()
        ids += [e["id"] for e in page["executions"]]
    assert len(ids) == 10 == len(set(ids))
    assert env.get(f"/jobs/{job['id']}/results?limit=0").status_code == 422


def test_pages_are_public_carry_no_data_and_ship_their_script(env: Env) -> None:
    job = env.submit({"questions": ["secret question"], "models": ["m1"]}).get_json()
    page = env.client.get(f"/jobs/{job['id']}/view")
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    assert "secret question" not in html and job["id"] in html
    assert "http://" not in html and "https://" not in html  # nothing from elsewhere
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    listing = env.client.get("/jobs/view")
    assert listing.status_code == 200 and 'data-page="jobs"' in listing.get_data(as_text=True)
    for name, expect in (("workbench.js", "Authorization"), ("workbench.css", "mark")):
        static = env.client.get(f"/ui/static/{name}")
        try:
            text = static.get_data(as_text=True)
            assert static.status_code == 200 and expect in text
            # answers are put in the page as text only, and the key never in a URL
            assert "innerHTML" not in text and "?key" not in text
        finally:
            static.close()  # a file response: its handle is closed on close()
    # the data itself still needs the key
    assert env.client.get(f"/jobs/{job['id']}/compare").status_code == 401


def test_call_params_carry_messages_and_a_seed_per_sample() -> None:
    from executor_service.dispatcher.jobs import call_params
    from executor_service.dispatcher.store.base import Claim, Failover

    chat = [{"role": "user", "content": "q?"}]
    base = {
        "execution_id": 1,
        "token": "t",
        "job_id": "j",
        "tenant": "t",
        "question_index": 0,
        "question": "q?",
        "model": "m",
        "requested_region": "a",
        "region": "a",
        "attempt": 1,
        "max_attempts": 3,
        "failover": Failover.NONE,
        "lease_expires_at": 0.0,
        "source": "new",
    }
    plain = Claim(**base, params={"temperature": 0.7})  # type: ignore[arg-type]
    assert call_params(plain) == {"temperature": 0.7}
    third = Claim(**base, params={"seed": 10}, sample=2, messages=chat)  # type: ignore[arg-type]
    assert call_params(third) == {"seed": 12, "messages": chat}
    assert third.params == {"seed": 10}  # the job's own parameters are not changed
