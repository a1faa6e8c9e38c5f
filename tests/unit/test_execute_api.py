"""The /execute contract of DESIGN.md, through the Flask test client on simulated models."""

from __future__ import annotations

import json
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient


def assert_error(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.data
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "details"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert isinstance(body["error"]["details"], dict)
    return body["error"]


def test_execute_answers_with_the_contract_fields(client: FlaskClient) -> None:
    r = client.post(
        "/execute", json={"model": "sim", "prompt": "What is 2+2?", "request_id": "abc"}
    )
    assert r.status_code == 200
    body = r.get_json()
    assert set(body) == {
        "request_id",
        "model",
        "provider",
        "region",
        "replica",
        "output",
        "finish_reason",
        "usage",
        "timing",
    }
    assert body["request_id"] == "abc" == r.headers["X-Request-ID"]
    assert (body["model"], body["provider"], body["region"], body["replica"]) == (
        "sim",
        "simulated",
        "unit",
        "r1",
    )
    assert body["output"] == "simulated answer to: What is 2+2?"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 6}
    assert set(body["timing"]) == {"queue_ms", "model_ms", "total_ms"}
    assert body["timing"]["total_ms"] >= body["timing"]["model_ms"] >= 0
    # the answer is exactly what the documented schema describes (no extra or wrong fields)
    from executor_service.executor.schemas import ExecuteResponseSchema

    assert ExecuteResponseSchema().validate(body) == {}


def test_messages_are_accepted_and_request_id_generated(client: FlaskClient) -> None:
    r = client.post(
        "/execute",
        json={
            "model": "sim",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Capital of France?"},
            ],
        },
    )
    assert r.status_code == 200
    assert r.json["output"].endswith("Capital of France?")
    assert len(r.json["request_id"]) == 32


def test_invalid_json_is_400(client: FlaskClient) -> None:
    r = client.post("/execute", data='{"model": ', content_type="application/json")
    assert_error(r, 400, "invalid_json")


def test_a_body_cut_short_is_answered_under_the_request_id_it_was_sent_with(
    client: FlaskClient,
) -> None:
    # a dispatcher killed mid-send leaves a truncated body: its 400 names the call
    r = client.post(
        "/execute",
        data='{"model": "sim", "pro',
        content_type="application/json",
        headers={"X-Request-ID": "job1.7.2"},
    )
    assert_error(r, 400, "invalid_json")
    assert r.headers["X-Request-ID"] == "job1.7.2"
    bad = client.post(
        "/execute",
        data="{",
        content_type="application/json",
        headers={"X-Request-ID": "not valid!"},
    )
    assert "X-Request-ID" not in bad.headers


def test_unknown_model_is_404_and_lists_the_catalog(client: FlaskClient) -> None:
    err = assert_error(
        client.post("/execute", json={"model": "gpt-9", "prompt": "x"}), 404, "unknown_model"
    )
    assert err["details"]["model"] == "gpt-9"
    assert "sim" in err["details"]["available"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": "x"}, "model"),
        ({"model": "sim"}, "_schema"),
        (
            {"model": "sim", "prompt": "x", "messages": [{"role": "user", "content": "y"}]},
            "_schema",
        ),
        ({"model": "sim", "prompt": ""}, "prompt"),
        ({"model": "sim", "prompt": "x" * 32_001}, "prompt"),
        ({"model": "sim", "prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"model": "sim", "prompt": "x", "max_tokens": 4097}, "max_tokens"),
        ({"model": "sim", "prompt": "x", "max_tokens": "10"}, "max_tokens"),
        ({"model": "sim", "prompt": "x", "temperature": 2.5}, "temperature"),
        ({"model": "sim", "prompt": "x", "seed": 1.5}, "seed"),
        ({"model": "sim", "prompt": "x", "timeout_s": 0}, "timeout_s"),
        ({"model": "sim", "prompt": "x", "colour": "red"}, "colour"),
        ({"model": "sim", "messages": [{"role": "robot", "content": "y"}]}, "messages"),
        ({"model": "sim", "messages": []}, "messages"),
        ({"model": 42, "prompt": "x"}, "model"),
    ],
)
def test_validation_errors_name_the_field(
    client: FlaskClient, body: dict[str, Any], field: str
) -> None:
    err = assert_error(client.post("/execute", json=body), 422, "validation_error")
    assert field in err["details"], err


def test_a_json_array_body_is_a_validation_error(client: FlaskClient) -> None:
    assert_error(client.post("/execute", json=["model"]), 422, "validation_error")


def test_body_over_the_limit_is_413(client: FlaskClient) -> None:
    big = json.dumps({"model": "sim", "prompt": "x" * (2 * 1024 * 1024)})
    assert_error(
        client.post("/execute", data=big, content_type="application/json"), 413, "payload_too_large"
    )


def test_provider_failure_is_502_with_provider_status(client: FlaskClient) -> None:
    err = assert_error(
        client.post("/execute", json={"model": "sim-5xx", "prompt": "x"}), 502, "provider_error"
    )
    assert err["details"] == {"provider": "simulated", "provider_status": 500}


def test_provider_rate_limit_is_429_rate_limited_with_retry_after(client: FlaskClient) -> None:
    r = client.post("/execute", json={"model": "sim-429", "prompt": "x"})
    err = assert_error(r, 429, "rate_limited")
    assert err["details"]["provider_status"] == 429
    assert err["details"]["retry_after_s"] == 7
    assert r.headers["Retry-After"] == "7"
    assert r.headers["retry-after-ms"] == "7000"


def test_deadline_gives_504(client: FlaskClient) -> None:
    r = client.post("/execute", json={"model": "sim-slow", "prompt": "x", "timeout_s": 0.05})
    err = assert_error(r, 504, "model_timeout")
    assert err["details"]["timeout_s"] == 0.05


def test_client_timeout_is_capped_by_the_server(catalog_path: Any) -> None:
    from executor_service import create_app
    from executor_service.config import Settings

    settings = Settings.from_env(
        environ={"ES_CATALOG": str(catalog_path), "ES_TIMEOUT_CAP_S": "0.05"}
    )
    c = create_app({"TESTING": True}, settings=settings).test_client()
    err = assert_error(
        c.post("/execute", json={"model": "sim-slow", "prompt": "x", "timeout_s": 30}),
        504,
        "model_timeout",
    )
    assert err["details"]["timeout_s"] == 0.05


def test_unexpected_exception_is_500_without_trace(app: Flask) -> None:
    app.testing = False  # let the error handler run instead of propagating
    r = app.test_client().post("/execute", json={"model": "sim-bug", "prompt": "secret prompt"})
    err = assert_error(r, 500, "internal")
    assert "Traceback" not in r.get_data(as_text=True)
    assert "simulated unexpected" not in r.get_data(as_text=True)
    assert err["details"] == {}


def test_overloaded_is_503_with_retry_after_at_once(app: Flask, client: FlaskClient) -> None:
    admission = app.extensions["executor"].admission
    held = [admission.slot() for _ in range(admission.limit)]
    for slot in held:
        slot.__enter__()
    try:
        r = client.post("/execute", json={"model": "sim", "prompt": "x"})
        err = assert_error(r, 503, "overloaded")
        assert r.headers["Retry-After"] == "1"
        assert err["details"]["limit"] == admission.limit
    finally:
        for slot in held:
            slot.__exit__(None, None, None)
    assert client.post("/execute", json={"model": "sim", "prompt": "x"}).status_code == 200


def test_unknown_route_and_wrong_method(client: FlaskClient) -> None:
    assert_error(client.get("/nowhere"), 404, "not_found")
    err = assert_error(client.get("/execute"), 405, "method_not_allowed")
    assert "POST" in err["details"]["allowed"]


def test_models_ready_health(client: FlaskClient) -> None:
    assert client.get("/health").json == {"status": "ok"}
    names = {m["name"] for m in client.get("/models").json["models"]}
    assert names == {"sim", "sim-slow", "sim-5xx", "sim-429", "sim-timeout", "sim-bug"}
    r = client.get("/ready")
    assert r.status_code == 200 and r.json["status"] == "ready"


def test_ready_is_503_while_draining(app: Flask, client: FlaskClient) -> None:
    app.extensions["executor"].draining = True
    assert_error(client.get("/ready"), 503, "not_ready")


def test_openapi_document_comes_from_the_schemas(client: FlaskClient) -> None:
    spec = client.get("/openapi.json").json
    assert spec["openapi"].startswith("3.")
    request_schema = spec["components"]["schemas"]["ExecuteRequest"]
    assert {"model", "prompt", "messages", "max_tokens", "temperature", "seed", "timeout_s"} <= set(
        request_schema["properties"]
    )
    assert request_schema["properties"]["max_tokens"]["maximum"] == 4096
    assert "/execute" in spec["paths"] and "post" in spec["paths"]["/execute"]
    assert client.get("/docs").status_code == 200
