"""The executor's OpenAI-compatible routes (/v1/chat/completions, /v1/models) through the
Flask test client on simulated models: OpenAI's shapes, and the same call path as /execute
(status codes, admission, deadline, metrics)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client import REGISTRY

from executor_service import create_app
from executor_service.config import Settings

HELLO = [{"role": "user", "content": "What is 2+2?"}]


def chat(client: FlaskClient, **body: Any) -> Any:
    return client.post("/v1/chat/completions", json={"model": "sim", "messages": HELLO, **body})


def assert_openai_error(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.data
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert set(body) == {"error"}
    assert {"message", "type", "param", "code"} <= set(body["error"])
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


def events(response: Any) -> list[Any]:
    """The data of each server-sent event, JSON-decoded ("[DONE]" kept as the string)."""
    assert response.mimetype == "text/event-stream"
    text = response.get_data(as_text=True)
    assert text.endswith("\n\n")
    out = []
    for block in text.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        data = block[len("data: ") :]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


def requests_total(model: str, status: int) -> float:
    value = REGISTRY.get_sample_value(
        "executor_requests_total", {"model": model, "status": str(status)}
    )
    return value or 0.0


def test_a_chat_completion_in_openai_shape(client: FlaskClient) -> None:
    r = chat(client, max_tokens=32, temperature=0, seed=1)
    assert r.status_code == 200
    body = r.get_json()
    assert body["object"] == "chat.completion"
    assert body["id"] == f"chatcmpl-{r.headers['X-Request-ID']}"
    assert isinstance(body["created"], int) and body["model"] == "sim"
    assert body["choices"] == [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "simulated answer to: What is 2+2?",
                "refusal": None,
            },
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}
    assert body["executor"]["region"] == "unit" and body["executor"]["provider"] == "simulated"
    # the same answer /execute gives for the same call
    same = client.post("/execute", json={"model": "sim", "messages": HELLO}).get_json()
    assert same["output"] == body["choices"][0]["message"]["content"]


def test_the_request_id_header_is_used(client: FlaskClient) -> None:
    r = client.post(
        "/v1/chat/completions",
        json={"model": "sim", "messages": HELLO},
        headers={"X-Request-ID": "req-42"},
    )
    assert r.get_json()["id"] == "chatcmpl-req-42" and r.headers["X-Request-ID"] == "req-42"


def test_text_parts_and_the_developer_role_are_read(client: FlaskClient) -> None:
    messages = [
        {"role": "developer", "content": "Be brief."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "a "}, {"type": "text", "text": "b"}],
        },
    ]
    r = client.post("/v1/chat/completions", json={"model": "sim", "messages": messages})
    assert r.status_code == 200, r.data
    assert r.get_json()["choices"][0]["message"]["content"] == "simulated answer to: a b"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": 2}, "n"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"logprobs": True}, "logprobs"),
        ({"stop": ["\n"]}, "stop"),
        ({"top_p": 0.5}, "top_p"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"frobnicate": 1}, "frobnicate"),
        ({"temperature": 3}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
    ],
)
def test_parameters_we_cannot_honour_are_refused_by_name(
    client: FlaskClient, extra: dict[str, Any], param: str
) -> None:
    err = assert_openai_error(chat(client, **extra), 422, "validation_error")
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param
    assert param in err["message"]


def test_unsupported_parameters_at_their_neutral_values_are_accepted(client: FlaskClient) -> None:
    r = chat(client, n=1, logprobs=False, top_p=1, presence_penalty=0, tools=[], user="u1")
    assert r.status_code == 200, r.data


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "tool", "content": "x"}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
        [{"role": "user", "content": "x", "name": "bob"}],
        [],
    ],
)
def test_messages_we_cannot_read_are_refused(client: FlaskClient, messages: list[Any]) -> None:
    r = client.post("/v1/chat/completions", json={"model": "sim", "messages": messages})
    err = assert_openai_error(r, 422, "validation_error")
    assert err["param"].startswith("messages")


def test_errors_keep_the_status_codes_of_execute(client: FlaskClient) -> None:
    err = assert_openai_error(chat(client, model="nope"), 404, "unknown_model")
    assert err["type"] == "invalid_request_error"
    assert "sim" in err["details"]["available"]
    err = assert_openai_error(chat(client, model="sim-5xx"), 502, "provider_error")
    assert err["type"] == "server_error" and err["details"]["provider_status"] == 500
    r = chat(client, model="sim-429")
    err = assert_openai_error(r, 429, "rate_limited")  # the client's RateLimitError
    assert err["type"] == "rate_limit_error" and err["details"]["retry_after_s"] == 7
    assert r.headers["Retry-After"] == "7"
    err = assert_openai_error(chat(client, model="sim-slow", timeout_s=0.05), 504, "model_timeout")
    assert err["details"]["timeout_s"] == 0.05
    bad = client.post("/v1/chat/completions", data="{", content_type="application/json")
    assert_openai_error(bad, 400, "invalid_json")


def test_an_unexpected_exception_is_500_without_trace(app: Flask) -> None:
    app.testing = False
    r = chat(app.test_client(), model="sim-bug")
    err = assert_openai_error(r, 500, "internal")
    assert err["type"] == "server_error"
    assert "simulated unexpected" not in r.get_data(as_text=True)


def test_a_bearer_key_is_required_when_keys_are_configured(catalog_path: Path) -> None:
    settings = Settings.from_env(
        environ={"ES_CATALOG": str(catalog_path), "ES_API_KEYS": "team:secret-key"}
    )
    client = create_app({"TESTING": True}, settings=settings).test_client()
    err = assert_openai_error(chat(client), 401, "unauthorized")
    assert err["type"] == "authentication_error"
    assert_openai_error(client.get("/v1/models"), 401, "unauthorized")
    ok = client.post(
        "/v1/chat/completions",
        json={"model": "sim", "messages": HELLO},
        headers={"Authorization": "Bearer secret-key"},
    )
    assert ok.status_code == 200


def test_a_full_executor_answers_503_at_once_on_v1_too(app: Flask, client: FlaskClient) -> None:
    admission = app.extensions["executor"].admission
    held = [admission.slot() for _ in range(admission.limit)]
    for slot in held:
        slot.__enter__()
    try:
        r = chat(client)
        err = assert_openai_error(r, 503, "overloaded")
        assert r.headers["Retry-After"] == "1" and err["type"] == "server_error"
        assert_openai_error(chat(client, stream=True), 503, "overloaded")
    finally:
        for slot in held:
            slot.__exit__(None, None, None)
    assert chat(client).status_code == 200


def test_v1_calls_count_in_the_execute_metrics(client: FlaskClient) -> None:
    before = requests_total("sim", 200), requests_total("unknown", 404)
    chat(client)
    chat(client, stream=True).get_data()
    chat(client, model="nope")
    assert requests_total("sim", 200) == before[0] + 2
    assert requests_total("unknown", 404) == before[1] + 1


def test_a_stream_in_openai_chunk_format(client: FlaskClient) -> None:
    r = chat(client, stream=True, stream_options={"include_usage": True})
    assert r.status_code == 200
    assert r.headers["Cache-Control"] == "no-cache"
    got = events(r)
    assert got[-1] == "[DONE]"
    chunks = got[:-1]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "simulated answer to: What is 2+2?"
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finish[-1] == "stop" and set(finish[:-1]) == {None}
    # include_usage: every chunk has usage null but the last, which has no choices
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}


def test_a_stream_without_include_usage_has_no_usage_field(client: FlaskClient) -> None:
    chunks = events(chat(client, stream=True))[:-1]
    assert all("usage" not in c for c in chunks)


def test_a_stream_that_fails_at_once_gets_its_status_code(client: FlaskClient) -> None:
    assert_openai_error(chat(client, model="sim-5xx", stream=True), 502, "provider_error")
    assert_openai_error(chat(client, model="nope", stream=True), 404, "unknown_model")


def test_a_stream_past_its_deadline_ends_with_an_error_event(client: FlaskClient) -> None:
    # sim-slow spreads 0.5 s over its 6 words: the first come, then the deadline passes.
    before = requests_total("sim-slow", 504)
    r = chat(client, model="sim-slow", stream=True, timeout_s=0.2)
    assert r.status_code == 200
    got = events(r)
    assert "[DONE]" not in got
    assert got[0]["choices"][0]["delta"]["role"] == "assistant"
    assert any(c.get("choices") and c["choices"][0]["delta"].get("content") for c in got[:-1])
    assert got[-1]["error"]["code"] == "model_timeout"
    assert got[-1]["error"]["type"] == "server_error"
    assert requests_total("sim-slow", 504) == before + 1


@pytest.fixture
def one_slot_client(catalog_path: Path) -> tuple[Flask, FlaskClient]:
    settings = Settings.from_env(environ={"ES_CATALOG": str(catalog_path), "ES_MAX_IN_FLIGHT": "1"})
    app = create_app({"TESTING": True}, settings=settings)
    return app, app.test_client()


def test_a_stream_holds_its_slot_until_the_client_goes_away(
    one_slot_client: tuple[Flask, FlaskClient],
) -> None:
    app, client = one_slot_client
    admission = app.extensions["executor"].admission
    before = requests_total("sim-slow", 499)
    r = client.post(
        "/v1/chat/completions",
        json={"model": "sim-slow", "messages": HELLO, "stream": True},
        buffered=False,
    )
    body = iter(r.response)
    assert next(body).startswith(b"data: ")
    assert admission.in_flight == 1
    # the only slot is taken by the stream: another call is refused at once
    assert_openai_error(chat(client), 503, "overloaded")
    assert client.post("/execute", json={"model": "sim", "prompt": "x"}).status_code == 503
    r.close()  # what the server does when its write to a gone client fails
    assert admission.in_flight == 0
    assert requests_total("sim-slow", 499) == before + 1
    assert chat(client).status_code == 200


def test_a_stream_read_to_the_end_frees_its_slot(
    one_slot_client: tuple[Flask, FlaskClient],
) -> None:
    app, client = one_slot_client
    events(chat(client, stream=True))
    assert app.extensions["executor"].admission.in_flight == 0
    assert chat(client).status_code == 200


def test_models_in_openai_shape(client: FlaskClient) -> None:
    body = client.get("/v1/models").get_json()
    assert body["object"] == "list"
    ids = {m["id"] for m in body["data"]}
    assert ids == {"sim", "sim-slow", "sim-5xx", "sim-429", "sim-timeout", "sim-bug"}
    one = client.get("/v1/models/sim").get_json()
    assert one["object"] == "model" and one["owned_by"] == "simulated"
    assert isinstance(one["created"], int)
    assert_openai_error(client.get("/v1/models/nope"), 404, "unknown_model")


def test_openapi_documents_the_v1_routes(client: FlaskClient) -> None:
    spec = client.get("/openapi.json").json
    assert "post" in spec["paths"]["/v1/chat/completions"]
    assert "get" in spec["paths"]["/v1/models"] and "get" in spec["paths"]["/v1/models/{model_id}"]
    request = spec["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert {"model", "messages", "max_tokens", "temperature", "seed", "stream"} <= set(request)
    responses = spec["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert {"200", "404", "422", "502", "503", "504"} <= set(responses)


def test_a_bug_in_the_middle_of_a_stream_ends_it_with_an_internal_error_event(
    app: Flask, client: FlaskClient, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    from executor_service.executor.providers import Chunk

    def broken(call: Any) -> Any:
        yield Chunk(text="half")
        raise RuntimeError("secret internals")

    provider = app.extensions["executor"].catalog.provider("sim")
    monkeypatch.setattr(provider, "stream", broken)
    before = requests_total("sim", 500)
    r = chat(client, stream=True)
    assert r.status_code == 200
    got = events(r)
    assert got[1]["choices"][0]["delta"]["content"] == "half"
    assert got[-1]["error"]["code"] == "internal"
    assert "secret internals" not in r.get_data(as_text=True)
    assert app.extensions["executor"].admission.in_flight == 0
    assert requests_total("sim", 500) == before + 1
    assert "stream failed" in caplog.text


def test_a_stream_closed_before_its_body_is_read_frees_its_slot(
    one_slot_client: tuple[Flask, FlaskClient],
) -> None:
    # As a WSGI server could: take the body and close it without iterating (the test
    # client always reads the first chunk, so call the app directly).
    from werkzeug.test import EnvironBuilder

    app, _ = one_slot_client
    body = {"model": "sim", "messages": HELLO, "stream": True}
    environ = EnvironBuilder(path="/v1/chat/completions", method="POST", json=body).get_environ()
    statuses: list[str] = []
    app_iter = app.wsgi_app(environ, lambda status, headers: statuses.append(status))
    assert statuses == ["200 OK"]
    assert app.extensions["executor"].admission.in_flight == 1
    before = requests_total("sim", 499)
    app_iter.close()  # type: ignore[attr-defined]
    assert app.extensions["executor"].admission.in_flight == 0
    assert requests_total("sim", 499) == before + 1  # closed as a stream: counted, logged
