"""The dispatcher's OpenAI Batch API (/v1/files, /v1/batches) through Flask's test client on
the in-memory store; the test plays the region workers through the store's claim API."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dispatcher_app import ALICE, BOB, DispatcherApp

from executor_service.dispatcher.api import create_dispatcher_app
from executor_service.dispatcher.config import DispatcherSettings
from executor_service.dispatcher.rules import ClaimRequest
from executor_service.dispatcher.store.memory import MemoryStore

REGIONS_TOML = """
[regions.us]
url = "http://127.0.0.1:9"
concurrency = 10
models = ["m1", "m2"]

[regions.eu]
url = "http://127.0.0.1:9"
concurrency = 10
models = ["m1"]
"""


class Env(DispatcherApp):
    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp, REGIONS_TOML, {"ES_MAX_JOB_EXECUTIONS": "50"})

    def upload(self, lines: list[Any], headers: dict[str, str] = ALICE) -> str:
        text = "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n"
        r = self.client.post(
            "/v1/files",
            data={"purpose": "batch", "file": (io.BytesIO(text.encode()), "in.jsonl")},
            headers=headers,
            content_type="multipart/form-data",
        )
        assert r.status_code == 200, r.get_json()
        return str(r.get_json()["id"])

    def batch(self, file_id: str, **extra: Any) -> Any:
        body = {
            "input_file_id": file_id,
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
            **extra,
        }
        return self.client.post("/v1/batches", json=body, headers=ALICE)

    def work(self, region: str, fail: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        """Play region's worker once: answer every claim, failing the questions in
        ``fail`` for good (a 400 from the executor)."""
        spec = self.regions[region].spec()
        for claim in self.store.claim(ClaimRequest(spec, 100, self.clock.now, 30, "w", 100)):
            if claim.question in fail:
                error = {"code": "validation_error", "message": "bad", "status": 422}
                self.store.fail(
                    claim.execution_id, claim.token, error, self.clock.now, self.clock.now, None
                )
                continue
            result = {
                "request_id": f"req-{claim.execution_id}",
                "output": f"{region} says {claim.question}",
                "finish_reason": "stop",
                "usage": {"prompt_tokens": 3, "completion_tokens": 4},
                "region": region,
                "replica": "r1",
                "provider": "simulated",
            }
            self.store.complete(
                claim.execution_id, claim.token, result, self.clock.now, self.clock.now
            )


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    yield e
    e.store.close()


def line(custom_id: str, content: str, model: str = "m1", **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": content}], **body},
    }


def jsonl(response: Any) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.data
    return [json.loads(x) for x in response.get_data(as_text=True).splitlines()]


def test_upload_and_read_back_a_file(env: Env) -> None:
    file_id = env.upload([line("a", "hi")])
    meta = env.client.get(f"/v1/files/{file_id}", headers=ALICE).get_json()
    assert meta["object"] == "file" and meta["purpose"] == "batch"
    assert meta["filename"] == "in.jsonl" and meta["bytes"] > 0
    content = env.client.get(f"/v1/files/{file_id}/content", headers=ALICE)
    assert json.loads(content.get_data(as_text=True)) == line("a", "hi")
    # another tenant sees nothing
    assert env.client.get(f"/v1/files/{file_id}", headers=BOB).status_code == 404


def test_an_upload_needs_a_file_and_purpose_batch(env: Env) -> None:
    r = env.client.post(
        "/v1/files",
        data={"purpose": "fine-tune", "file": (io.BytesIO(b"x"), "a.jsonl")},
        headers=ALICE,
        content_type="multipart/form-data",
    )
    err = r.get_json()["error"]
    assert r.status_code == 422 and err["param"] == "purpose" and err["code"] == "validation_error"
    r = env.client.post(
        "/v1/files", data={"purpose": "batch"}, headers=ALICE, content_type="multipart/form-data"
    )
    assert r.status_code == 422 and r.get_json()["error"]["param"] == "file"


def test_a_batch_fans_out_to_each_requested_region_and_completes(env: Env) -> None:
    file_id = env.upload([line("q1", "one", seed=1), line("q2", "two", temperature=0)])
    r = env.batch(file_id, metadata={"regions": "us,eu", "note": "trial"})
    assert r.status_code == 200, r.get_json()
    batch = r.get_json()
    assert batch["object"] == "batch" and batch["id"].startswith("batch_")
    assert batch["status"] == "in_progress"
    assert batch["request_counts"] == {"total": 4, "completed": 0, "failed": 0}
    assert batch["metadata"] == {"regions": "us,eu", "note": "trial"}
    assert batch["output_file_id"] is None
    # different parameters: two jobs, each in both regions
    assert len(env.store.jobs) == 2

    env.work("us")
    mid = env.client.get(f"/v1/batches/{batch['id']}", headers=ALICE).get_json()
    assert mid["status"] == "in_progress"
    assert mid["request_counts"] == {"total": 4, "completed": 2, "failed": 0}
    env.work("eu")
    done = env.client.get(f"/v1/batches/{batch['id']}", headers=ALICE).get_json()
    assert done["status"] == "completed"
    assert done["request_counts"] == {"total": 4, "completed": 4, "failed": 0}
    assert done["completed_at"] is not None and done["error_file_id"] is None
    out = jsonl(env.client.get(f"/v1/files/{done['output_file_id']}/content", headers=ALICE))
    assert [(o["custom_id"], o["region"]) for o in out] == [
        ("q1", "eu"),
        ("q1", "us"),
        ("q2", "eu"),
        ("q2", "us"),
    ]
    first = out[0]
    assert first["error"] is None
    assert first["response"]["status_code"] == 200
    body = first["response"]["body"]
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"] == "eu says one"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert first["response"]["request_id"] == body["id"].removeprefix("chatcmpl-")
    # the parameters reached the jobs: OpenAI's default temperature 1 unless given
    params = sorted((j.job.params for j in env.store.jobs.values()), key=lambda p: p["temperature"])
    assert params == [{"temperature": 0}, {"temperature": 1.0, "seed": 1}]


def test_default_regions_are_every_region_serving_the_model(env: Env) -> None:
    batch = env.batch(env.upload([line("a", "x", model="m1"), line("b", "y", model="m2")]))
    assert batch.get_json()["request_counts"]["total"] == 3  # m1: us + eu, m2: us


def test_failures_go_to_the_error_file(env: Env) -> None:
    batch = env.batch(env.upload([line("ok", "fine"), line("bad", "broken")]), regions=["us"])
    batch_id = batch.get_json()["id"]
    env.work("us", fail={"broken"})
    done = env.client.get(f"/v1/batches/{batch_id}", headers=ALICE).get_json()
    assert done["status"] == "completed"
    assert done["request_counts"] == {"total": 2, "completed": 1, "failed": 1}
    errors = jsonl(env.client.get(f"/v1/files/{done['error_file_id']}/content", headers=ALICE))
    assert len(errors) == 1
    assert errors[0]["custom_id"] == "bad" and errors[0]["region"] == "us"
    assert errors[0]["error"] == {"code": "validation_error", "message": "bad"}
    assert errors[0]["response"]["status_code"] == 422
    out = jsonl(env.client.get(f"/v1/files/{done['output_file_id']}/content", headers=ALICE))
    assert [o["custom_id"] for o in out] == ["ok"]


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (
            [line("a", "x"), "{not json", line("a", "y")],
            [("invalid_json_line", 2), ("duplicate_custom_id", 3)],
        ),
        (
            [line("a", "x"), {**line("b", "y"), "url": "/v1/embeddings"}],
            [("mismatched_endpoint", 2)],
        ),
        ([line("a", "x", model="nope")], [("model_not_found", 1)]),
        ([line("a", "x", n=3)], [("invalid_request", 1)]),
        (
            [{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions"}],
            [("missing_required_parameter", 1)],
        ),
        ([line("a", "x", stream=True)], [("invalid_request", 1)]),
        (["", "  "], [("empty_file", None)]),
    ],
)
def test_a_bad_file_fails_validation_with_line_numbers(
    env: Env, lines: list[Any], expected: list[tuple[str, int | None]]
) -> None:
    r = env.batch(env.upload(lines))
    assert r.status_code == 200
    batch = r.get_json()
    assert batch["status"] == "failed" and batch["failed_at"] is not None
    assert [(e["code"], e["line"]) for e in batch["errors"]["data"]] == expected
    assert all(e["message"] for e in batch["errors"]["data"])
    assert env.store.jobs == {}  # nothing queued
    again = env.client.get(f"/v1/batches/{batch['id']}", headers=ALICE).get_json()
    assert again["status"] == "failed"


def test_a_region_that_does_not_serve_a_line_model_fails_that_line(env: Env) -> None:
    batch = env.batch(env.upload([line("a", "x", model="m2")]), metadata={"regions": "eu"})
    [error] = batch.get_json()["errors"]["data"]
    assert error["line"] == 1 and "not served in ['eu']" in error["message"]


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"endpoint": "/v1/embeddings"}, "endpoint"),
        ({"completion_window": "1h"}, "completion_window"),
        ({"regions": ["mars"]}, "regions"),
        ({"metadata": {"failover": "sometimes"}}, "failover"),
    ],
)
def test_a_bad_batch_request_is_a_422(env: Env, extra: dict[str, Any], param: str) -> None:
    r = env.batch(env.upload([line("a", "x")]), **extra)
    assert r.status_code == 422, r.get_json()
    assert r.get_json()["error"]["param"] == param


def test_an_unknown_input_file_is_404(env: Env) -> None:
    r = env.batch("file-nope")
    assert r.status_code == 404 and r.get_json()["error"]["type"] == "invalid_request_error"


def test_cancel_then_the_rest_is_in_the_error_file(env: Env) -> None:
    batch_id = env.batch(env.upload([line("a", "x"), line("b", "y")]), regions=["us"]).get_json()[
        "id"
    ]
    spec = env.regions["us"].spec()
    [claim] = env.store.claim(ClaimRequest(spec, 1, env.clock.now, 30, "w", 1))
    r = env.client.post(f"/v1/batches/{batch_id}/cancel", headers=ALICE)
    assert r.status_code == 200 and r.get_json()["status"] == "cancelling"
    result = {"request_id": "r", "output": "late", "finish_reason": "stop", "usage": {}}
    env.store.complete(claim.execution_id, claim.token, result, env.clock.now, env.clock.now)
    done = env.client.get(f"/v1/batches/{batch_id}", headers=ALICE).get_json()
    assert done["status"] == "cancelled" and done["cancelled_at"] is not None
    assert done["request_counts"] == {"total": 2, "completed": 1, "failed": 1}
    errors = jsonl(env.client.get(f"/v1/files/{done['error_file_id']}/content", headers=ALICE))
    assert [(e["custom_id"], e["error"]["code"]) for e in errors] == [("b", "batch_cancelled")]
    assert env.client.post(f"/v1/batches/{batch_id}/cancel", headers=ALICE).status_code == 200
    env.work("us")
    failed = env.batch(env.upload(["{"])).get_json()["id"]
    assert env.client.post(f"/v1/batches/{failed}/cancel", headers=ALICE).status_code == 409


def test_list_batches_newest_first_with_paging(env: Env) -> None:
    file_id = env.upload([line("a", "x")])
    ids = []
    for _ in range(3):
        ids.append(env.batch(file_id).get_json()["id"])
        env.clock.now += 1
    page = env.client.get("/v1/batches?limit=2", headers=ALICE).get_json()
    assert [b["id"] for b in page["data"]] == [ids[2], ids[1]]
    assert page["has_more"] is True and page["last_id"] == ids[1]
    rest = env.client.get(f"/v1/batches?limit=2&after={ids[1]}", headers=ALICE).get_json()
    assert [b["id"] for b in rest["data"]] == [ids[0]] and rest["has_more"] is False
    assert env.client.get("/v1/batches", headers=BOB).get_json()["data"] == []
    assert env.client.get(f"/v1/batches/{ids[0]}", headers=BOB).status_code == 404


def test_a_batch_left_validating_by_a_crash_is_finished_when_read(env: Env) -> None:
    from executor_service.dispatcher import openai_batch as ob
    from executor_service.dispatcher.store.objects import objects_for

    batch_id = env.batch(env.upload([line("a", "x")]), regions=["us"]).get_json()["id"]
    objects = objects_for(env.store)
    obj = objects.get("alice", "batch", batch_id)
    assert obj is not None
    # put it back as it was between "batch stored" and "jobs created"
    [job] = obj.body["_jobs"]
    plan = ob.plan_body(
        ob.plan_jobs(
            batch_id,
            "alice",
            [ob.BatchLine(1, "a", "m1", [{"role": "user", "content": "x"}], {"temperature": 1.0})],
            env.regions,
            ["us"],
            ob.Failover.NONE,
        )
    )
    body = {k: v for k, v in obj.body.items() if k != "_jobs"}
    objects.update_body("alice", "batch", batch_id, {**body, "status": "validating", "_plan": plan})
    again = env.client.get(f"/v1/batches/{batch_id}", headers=ALICE).get_json()
    assert again["status"] == "in_progress" and again["request_counts"]["total"] == 1
    assert len(env.store.jobs) == 1  # the same job (its idempotency key), not a second one
    assert job["job_id"] in env.store.jobs


def test_openapi_documents_the_batch_routes(env: Env) -> None:
    spec = env.client.get("/openapi.json", headers=ALICE).get_json()
    for path in (
        "/v1/files",
        "/v1/files/{file_id}/content",
        "/v1/batches",
        "/v1/batches/{batch_id}",
        "/v1/batches/{batch_id}/cancel",
    ):
        assert path in spec["paths"], path
    assert "multipart/form-data" in spec["paths"]["/v1/files"]["post"]["requestBody"]["content"]


def test_reuse_is_asked_in_metadata_and_reaches_the_jobs(env: Env) -> None:
    batch = env.batch(env.upload([line("a", "x", temperature=0)]), metadata={"reuse": "true"})
    assert batch.get_json()["reuse"] is True
    [job] = env.store.jobs.values()
    assert job.job.params == {"temperature": 0, "reuse": True}
    assert env.batch(env.upload([line("a", "x")]), reuse="perhaps").status_code == 422


def test_a_system_prompt_and_a_conversation_are_sent_as_chat_messages(env: Env) -> None:
    from executor_service.dispatcher.openai_batch import JOB_MESSAGES

    messages = [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
    ]
    chat = line("c", "unused")
    chat["body"]["messages"] = messages
    batch = env.batch(env.upload([chat, line("p", "plain")]), regions=["us"]).get_json()
    if not JOB_MESSAGES:  # jobs without chat messages: refused by line, never flattened
        assert batch["status"] == "failed"
        assert [(e["line"], e["param"]) for e in batch["errors"]["data"]] == [(1, "body.messages")]
        return
    assert batch["status"] == "in_progress"
    [job] = env.store.jobs.values()
    new = job.job
    assert new.questions == ["And of Italy?", "plain"]
    spec = env.regions["us"].spec()
    claims = env.store.claim(ClaimRequest(spec, 10, env.clock.now, 30, "w", 10))
    sent = {c.question: getattr(c, "messages", None) for c in claims}
    assert sent == {"And of Italy?": messages, "plain": None}


def test_a_file_over_the_body_limit_is_413_in_openai_shape(tmp_path: Path) -> None:
    regions = tmp_path / "regions.toml"
    regions.write_text(REGIONS_TOML)
    settings = DispatcherSettings.from_env(
        environ={
            "ES_REGIONS_FILE": str(regions),
            "ES_DATABASE_URL": "memory://",
            "ES_API_KEYS": "alice:key-a",
            "ES_MAX_BODY_BYTES": "2000",
        }
    )
    app = create_dispatcher_app({"TESTING": True}, settings=settings, store=MemoryStore())
    r = app.test_client().post(
        "/v1/files",
        data={"purpose": "batch", "file": (io.BytesIO(b"x" * 5000), "big.jsonl")},
        headers=ALICE,
        content_type="multipart/form-data",
    )
    assert r.status_code == 413
    assert r.get_json()["error"]["code"] == "payload_too_large"
    assert r.get_json()["error"]["type"] == "invalid_request_error"
