"""The executor client against a real local HTTP server: what it sends, and how every kind of
answer (or silence) is classified."""

from __future__ import annotations

import email.utils
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from support import free_port
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from executor_service.dispatcher import client as client_module
from executor_service.dispatcher.client import ExecutorClient, Outcome, parse_retry_after
from executor_service.dispatcher.regions import Region
from executor_service.dispatcher.scheduler import CallVerdict

NOW = 1_700_000_000.0


def _error(code: str, status: int, details: dict[str, Any] | None = None, **headers: str) -> Any:
    body = json.dumps({"error": {"code": code, "message": f"{code} happened", "details": details}})
    return Response(body, status, headers=headers, content_type="application/json")


def _answers(scenario: str) -> Response:
    if scenario == "ok":
        return Response(json.dumps({"output": "hello", "region": "r"}), 200)
    if scenario == "overloaded":
        return _error("overloaded", 503, {}, **{"Retry-After": "2"})
    if scenario == "provider":
        details = {"provider_status": 429, "retry_after_s": 7.5}
        return _error("provider_error", 502, details, **{"Retry-After": "8"})
    if scenario == "provider500":
        return _error("provider_error", 502, {"provider_status": 500})
    if scenario == "rate_limited":
        limits = {"remaining_requests": 0, "reset_requests_s": 1.5, "limit_requests": 60}
        details = {"provider_status": 429, "retry_after_s": 1.5, "ratelimit": limits}
        return _error("rate_limited", 429, details, **{"Retry-After": "2"})
    if scenario == "model_timeout":
        return _error("model_timeout", 504, {"timeout_s": 1})
    if scenario == "unknown_model":
        return _error("unknown_model", 404)
    if scenario == "invalid":
        return _error("validation_error", 422, {"prompt": ["bad"]})
    if scenario == "r408":
        return Response("request timeout", 408)
    if scenario == "r429date":
        when = email.utils.formatdate(time.time() + 30, usegmt=True)
        return Response("slow down", 429, headers={"Retry-After": when})
    if scenario == "garbage":
        return Response("<html>not json</html>", 200)
    if scenario == "slow":
        time.sleep(2.0)
        return Response(json.dumps({"output": "late"}), 200)
    return Response("no such scenario", 500)


class Server:
    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, Any], dict[str, str]]] = []
        self.port = free_port()

        @Request.application
        def app(request: Request) -> Response:
            self.requests.append((request.get_json(silent=True) or {}, dict(request.headers)))
            return _answers(request.path.split("/")[1])

        self.server = make_server("127.0.0.1", self.port, app, threaded=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def region(self, scenario: str, timeout_s: float = 10.0) -> Region:
        url = f"http://127.0.0.1:{self.port}/{scenario}"
        return Region("r1", url, 2, ("m",), timeout_s=timeout_s)


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    srv = Server()
    srv.thread.start()
    yield srv
    srv.server.shutdown()


def call(server: Server, scenario: str, **params: Any) -> Any:
    client = ExecutorClient(server.region(scenario), api_key="k-1")
    try:
        return client.execute("m", "why?", "job.1.1", params)
    finally:
        client.close()


def test_success_sends_the_contract_and_returns_the_body(server: Server) -> None:
    result = call(server, "ok", max_tokens=5, temperature=0.5, seed=3, timeout_s=None)
    assert result.outcome is Outcome.SUCCESS and result.ok
    assert result.body["output"] == "hello"
    assert result.verdict is CallVerdict.HEALTHY
    body, headers = server.requests[-1]
    assert body == {
        "model": "m",
        "prompt": "why?",
        "request_id": "job.1.1",
        "timeout_s": 10.0,  # the region's default
        "max_tokens": 5,
        "temperature": 0.5,
        "seed": 3,
    }
    assert headers["Authorization"] == "Bearer k-1"


def test_chat_messages_are_sent_instead_of_the_prompt(server: Server) -> None:
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "why?"}]
    assert call(server, "ok", messages=chat).ok
    body, _ = server.requests[-1]
    assert body["messages"] == chat and "prompt" not in body


@pytest.mark.parametrize(
    ("scenario", "code", "status", "retry_after"),
    [
        ("provider500", "provider_error", 502, None),
        ("model_timeout", "model_timeout", 504, None),
        ("r408", "http_408", 408, None),
    ],
)
def test_retryable_answers(
    server: Server, scenario: str, code: str, status: int, retry_after: float | None
) -> None:
    result = call(server, scenario)
    assert result.outcome is Outcome.RETRYABLE
    assert result.verdict is CallVerdict.UNHEALTHY
    assert result.error["code"] == code and result.error["status"] == status
    assert result.retry_after_s == retry_after


@pytest.mark.parametrize(
    ("scenario", "code", "status", "retry_after"),
    [
        ("rate_limited", "rate_limited", 429, 1.5),  # details beat the rounded header
        ("overloaded", "overloaded", 503, 2.0),
        ("provider", "provider_error", 502, 7.5),  # an older executor's 502 for a 429
    ],
)
def test_backpressure_is_deferred_and_never_unhealthy(
    server: Server, scenario: str, code: str, status: int, retry_after: float
) -> None:
    result = call(server, scenario)
    assert result.outcome is Outcome.DEFERRED
    assert result.verdict is CallVerdict.NEUTRAL
    assert result.error["code"] == code and result.error["status"] == status
    assert result.retry_after_s == retry_after
    if scenario != "overloaded":
        assert result.error["provider_status"] == 429
    if scenario == "rate_limited":
        assert result.error["ratelimit"]["reset_requests_s"] == 1.5


def test_retry_after_as_http_date(server: Server) -> None:
    result = call(server, "r429date")
    assert result.outcome is Outcome.DEFERRED and result.error["status"] == 429
    assert 25 <= result.retry_after_s <= 31


@pytest.mark.parametrize(
    ("scenario", "code"), [("unknown_model", "unknown_model"), ("invalid", "validation_error")]
)
def test_other_4xx_are_fatal(server: Server, scenario: str, code: str) -> None:
    result = call(server, scenario)
    assert result.outcome is Outcome.FATAL
    assert result.verdict is CallVerdict.NEUTRAL
    assert result.error["code"] == code and "happened" in result.error["message"]


def test_a_200_without_an_answer_is_retryable(server: Server) -> None:
    result = call(server, "garbage")
    assert result.outcome is Outcome.RETRYABLE and result.error["code"] == "bad_response"


def test_unreachable_executor_is_retryable_with_a_clear_message() -> None:
    port = free_port()
    client = ExecutorClient(Region("down", f"http://127.0.0.1:{port}", 1, ("m",)))
    result = client.execute("m", "q", "rid", {})
    assert result.outcome is Outcome.RETRYABLE
    assert result.error["code"] == "connection_error"
    assert f"127.0.0.1:{port}" in result.error["message"]


def test_no_answer_in_time_is_a_retryable_timeout(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client_module, "READ_MARGIN_S", 0.0)
    result = call(server, "slow", timeout_s=0.2)
    assert result.outcome is Outcome.RETRYABLE and result.error["code"] == "timeout"
    assert result.elapsed_s < 1.9  # gave up before the server answered


def test_parse_retry_after() -> None:
    assert parse_retry_after("3", NOW) == 3.0
    assert parse_retry_after("1.5", NOW) == 1.5
    assert parse_retry_after(None, NOW) is None
    assert parse_retry_after("soon", NOW) is None
    assert parse_retry_after("-4", NOW) is None
    date = email.utils.formatdate(NOW + 60, usegmt=True)
    assert parse_retry_after(date, NOW) == pytest.approx(60, abs=1)
    past = email.utils.formatdate(NOW - 60, usegmt=True)
    assert parse_retry_after(past, NOW) == 0.0
