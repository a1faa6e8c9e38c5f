"""The ``openai`` provider against a small local HTTP server that plays the upstream."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from executor_service.config import ConfigError
from executor_service.executor.providers import (
    Call,
    Chunk,
    ProviderFailure,
    ProviderTimeout,
    create_provider,
)
from executor_service.executor.providers.openai import OpenAIProvider, parse_retry_after

SECRET = "sk-test-0123456789abcdef-never-show-me"
OK_BODY = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "4"}, "finish_reason": "stop"}
    ],
    "usage": {"prompt_tokens": 12, "completion_tokens": 1, "total_tokens": 13},
}


@dataclass
class Reply:
    status: int = 200
    body: bytes | dict[str, Any] = field(default_factory=lambda: OK_BODY)
    headers: dict[str, str] = field(default_factory=dict)
    wait_for_release: bool = False  # hold the answer until the test ends (a hung upstream)
    stream: list[bytes] | None = None  # written piece by piece as server-sent events
    pause_s: float = 0.0  # between two pieces of the stream (the upstream's own pace)


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: dict[str, Any]


class Upstream:
    """A stand-in for an OpenAI-compatible server: answers with ``reply``, records requests."""

    def __init__(self) -> None:
        self.reply = Reply()
        self.seen: list[Seen] = []
        self.release = threading.Event()
        self.cut = False
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                raw = self.rfile.read(length)
                url = urlsplit(self.path)
                upstream.seen.append(
                    Seen(
                        "POST",
                        url.path,
                        parse_qs(url.query),
                        {k.lower(): v for k, v in self.headers.items()},
                        json.loads(raw) if raw else {},
                    )
                )
                reply = upstream.reply
                if reply.wait_for_release:
                    upstream.release.wait(timeout=10)
                if reply.stream is not None:
                    self._stream(reply)
                    return
                body = reply.body
                data = json.dumps(body).encode() if isinstance(body, dict) else body
                try:
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (the timeout test)

            def _stream(self, reply: Reply) -> None:
                # HTTP/1.0 without a length: the stream ends when the connection closes.
                try:
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "text/event-stream")
                    self.end_headers()
                    for piece in reply.stream or []:
                        if upstream.release.is_set():
                            return
                        self.wfile.write(piece)
                        self.wfile.flush()
                        time.sleep(reply.pause_s)
                except (BrokenPipeError, ConnectionResetError):
                    upstream.cut = True  # the client closed the stream

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        # A short poll interval so shutdown() in teardown returns at once.
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    def __enter__(self) -> Upstream:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    with Upstream() as server:
        yield server


@pytest.fixture
def secret_env(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("UPSTREAM_TEST_KEY", SECRET)
    return "UPSTREAM_TEST_KEY"


def make(base_url: str, **options: Any) -> OpenAIProvider:
    provider = create_provider("openai", "catalog-name", {"base_url": base_url, **options})
    assert isinstance(provider, OpenAIProvider)
    provider.load()
    return provider


def call(timeout_s: float = 5.0, **kwargs: Any) -> Call:
    import time

    return Call(
        messages=[{"role": "user", "content": "What is 2+2?"}],
        deadline=time.monotonic() + timeout_s,
        **kwargs,
    )


def all_text(exc: BaseException) -> str:
    """Everything an exception could show: message, repr and the chained traceback."""
    return str(exc) + repr(exc) + "".join(traceback.format_exception(exc))


def test_success_maps_the_answer_and_sends_the_call(upstream: Upstream) -> None:
    provider = make(upstream.base_url, remote_model="upstream-name")
    completion = provider.complete(call(max_tokens=7, temperature=0.5, seed=42, request_id="req-1"))
    assert completion.output == "4"
    assert completion.finish_reason == "stop"
    assert (completion.prompt_tokens, completion.completion_tokens) == (12, 1)
    [seen] = upstream.seen
    assert seen.path == "/v1/chat/completions"
    assert seen.body == {
        "model": "upstream-name",
        "messages": [{"role": "user", "content": "What is 2+2?"}],
        "max_tokens": 7,
        "temperature": 0.5,
        "seed": 42,
    }
    # Not forwarded: some servers (llama_cpp.server) reject an X-Request-ID that is no UUID.
    assert "x-request-id" not in seen.headers
    assert "authorization" not in seen.headers  # no api_key_env, no key


def test_defaults_send_the_catalog_name_and_no_seed(upstream: Upstream) -> None:
    make(upstream.base_url).complete(call())
    [seen] = upstream.seen
    assert seen.body["model"] == "catalog-name"
    assert "seed" not in seen.body


def test_extra_headers_are_sent(upstream: Upstream) -> None:
    make(upstream.base_url, extra_headers={"X-Team": "evals"}).complete(call())
    assert upstream.seen[0].headers["x-team"] == "evals"


def test_the_key_goes_in_the_bearer_header(upstream: Upstream, secret_env: str) -> None:
    make(upstream.base_url, api_key_env=secret_env).complete(call())
    assert upstream.seen[0].headers["authorization"] == f"Bearer {SECRET}"


def test_azure_style_url_header_and_version(upstream: Upstream, secret_env: str) -> None:
    provider = make(
        upstream.base_url.removesuffix("/v1"),
        api_style="azure",
        remote_model="gpt-4o-eu",
        api_version="2024-06-01",
        api_key_env=secret_env,
    )
    assert provider.complete(call()).output == "4"
    [seen] = upstream.seen
    assert seen.path == "/openai/deployments/gpt-4o-eu/chat/completions"
    assert seen.query == {"api-version": ["2024-06-01"]}
    assert seen.headers["api-key"] == SECRET
    assert "authorization" not in seen.headers
    assert "model" not in seen.body


def test_429_with_retry_after_seconds(upstream: Upstream) -> None:
    upstream.reply = Reply(
        429,
        {"error": {"message": "Rate limit reached for requests", "type": "requests"}},
        {"Retry-After": "7"},
    )
    with pytest.raises(ProviderFailure) as info:
        make(upstream.base_url).complete(call())
    assert info.value.status == 429
    assert info.value.retry_after_s == 7.0
    assert "Rate limit reached for requests" in info.value.message


def test_429_with_retry_after_http_date(upstream: Upstream) -> None:
    upstream.reply = Reply(
        429, {"error": "slow down"}, {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}
    )
    with pytest.raises(ProviderFailure) as info:
        make(upstream.base_url).complete(call())
    # A date in the past means "now".
    assert info.value.retry_after_s == 0.0
    assert "slow down" in info.value.message


def test_retry_after_ms_when_there_is_no_retry_after(upstream: Upstream) -> None:
    upstream.reply = Reply(429, {"error": {"message": "busy"}}, {"retry-after-ms": "1500"})
    with pytest.raises(ProviderFailure) as info:
        make(upstream.base_url).complete(call())
    assert info.value.retry_after_s == 1.5


def test_parse_retry_after() -> None:
    now = 1_445_412_480.0  # Wed, 21 Oct 2015 07:28:00 GMT
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now=now) == 30.0
    assert parse_retry_after("2.5") == 2.5
    assert parse_retry_after("-3") == 0.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("nan") is None


def test_500_reports_status_and_a_short_excerpt(upstream: Upstream) -> None:
    upstream.reply = Reply(500, b"<html>" + b"x" * 5000 + b"</html>")
    with pytest.raises(ProviderFailure) as info:
        make(upstream.base_url).complete(call())
    assert info.value.status == 500
    assert info.value.retry_after_s is None
    assert "HTTP 500 Internal Server Error" in info.value.message
    assert "<html>xxx" in info.value.message
    assert len(info.value.message) < 300


def test_a_redirect_is_not_followed(upstream: Upstream) -> None:
    upstream.reply = Reply(307, b"", {"Location": "http://127.0.0.1:9/elsewhere"})
    with pytest.raises(ProviderFailure) as info:
        make(upstream.base_url).complete(call())
    assert info.value.status == 307
    assert len(upstream.seen) == 1


@pytest.mark.parametrize(
    "body",
    [
        b"not json at all",
        {"object": "chat.completion"},
        {"choices": []},
        {"choices": [{"message": "4"}]},
        {"choices": [{"message": {"content": 4}, "finish_reason": "stop"}]},
    ],
    ids=["not-json", "no-choices", "empty-choices", "message-not-object", "content-not-text"],
)
def test_a_malformed_200_is_a_failure(upstream: Upstream, body: Any) -> None:
    upstream.reply = Reply(200, body)
    with pytest.raises(ProviderFailure) as info:
        make(upstream.base_url).complete(call())
    assert "malformed answer" in info.value.message
    assert info.value.status is None


def test_missing_usage_and_null_content_are_tolerated(upstream: Upstream) -> None:
    upstream.reply = Reply(
        200, {"choices": [{"message": {"content": None}, "finish_reason": "content_filter"}]}
    )
    completion = make(upstream.base_url).complete(call())
    assert completion.output == ""
    assert completion.finish_reason == "content_filter"
    assert (completion.prompt_tokens, completion.completion_tokens) == (0, 0)


def test_connection_refused(secret_env: str, caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Nothing listens on the port now.
    base_url = f"http://127.0.0.1:{port}/v1"
    with caplog.at_level(logging.DEBUG), pytest.raises(ProviderFailure) as info:
        make(base_url, api_key_env=secret_env).complete(call())
    assert info.value.status is None
    assert info.value.message == f"cannot connect to {base_url}"
    assert SECRET not in all_text(info.value)
    assert SECRET not in caplog.text


def test_a_slow_upstream_times_out_at_the_deadline(upstream: Upstream) -> None:
    upstream.reply = Reply(wait_for_release=True)
    with pytest.raises(ProviderTimeout):
        make(upstream.base_url).complete(call(timeout_s=0.3))


def test_a_deadline_already_past_sends_nothing(upstream: Upstream) -> None:
    with pytest.raises(ProviderTimeout):
        make(upstream.base_url).complete(call(timeout_s=-1))
    assert upstream.seen == []


def test_the_key_never_appears_in_errors_or_logs(
    upstream: Upstream, secret_env: str, caplog: pytest.LogCaptureFixture
) -> None:
    # An upstream that echoes the key back in its error message.
    upstream.reply = Reply(401, {"error": {"message": f"Incorrect API key provided: {SECRET}"}})
    with caplog.at_level(logging.DEBUG), pytest.raises(ProviderFailure) as info:
        make(upstream.base_url, api_key_env=secret_env).complete(call())
    assert info.value.status == 401
    assert "Incorrect API key provided: ***" in info.value.message
    assert SECRET not in all_text(info.value)
    assert SECRET not in caplog.text


def test_a_missing_key_variable_is_named_at_load(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("UPSTREAM_TEST_KEY", raising=False)
    provider = create_provider(
        "openai", "m", {"base_url": "http://127.0.0.1:9/v1", "api_key_env": "UPSTREAM_TEST_KEY"}
    )
    with pytest.raises(ConfigError, match="UPSTREAM_TEST_KEY"):
        provider.load()
    assert not provider.loaded


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "base_url"),
        ({"base_url": "ftp://example"}, "base_url"),
        ({"base_url": "http://127.0.0.1:9", "api_style": "anthropic"}, "api_style"),
        ({"base_url": "http://127.0.0.1:9", "pool_size": 0}, "pool_size"),
        ({"base_url": "http://127.0.0.1:9", "extra_headers": "X-A: 1"}, "extra_headers"),
    ],
)
def test_bad_options_are_config_errors(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        create_provider("openai", "m", options)


def test_close_releases_the_session(upstream: Upstream) -> None:
    provider = make(upstream.base_url)
    assert provider.loaded
    provider.close()
    assert not provider.loaded


def sse(*events: dict[str, Any] | str) -> list[bytes]:
    return [f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n".encode() for e in events]


def delta(text: str | None = None, finish: str | None = None) -> dict[str, Any]:
    d = {} if text is None else {"content": text}
    return {"choices": [{"index": 0, "delta": d, "finish_reason": finish}]}


def test_a_stream_reads_the_upstream_events(upstream: Upstream) -> None:
    usage = {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}
    upstream.reply = Reply(
        stream=[
            b": a comment\n\n",
            *sse(delta(""), delta("Hel"), delta("lo"), delta(finish="stop")),
            *sse({"choices": [], "usage": usage}, "[DONE]"),
        ]
    )
    chunks = list(make(upstream.base_url).stream(call(max_tokens=5, seed=3)))
    assert chunks == [
        Chunk(text="Hel"),
        Chunk(text="lo"),
        Chunk(finish_reason="stop", prompt_tokens=9, completion_tokens=2),
    ]
    [seen] = upstream.seen
    assert seen.body["stream"] is True
    assert seen.body["stream_options"] == {"include_usage": True}
    assert seen.body["seed"] == 3


def test_a_stream_without_usage_counts_the_deltas(upstream: Upstream) -> None:
    upstream.reply = Reply(stream=sse(delta("a"), delta("b"), delta(finish="length"), "[DONE]"))
    *_, last = make(upstream.base_url).stream(call())
    assert last == Chunk(finish_reason="length", prompt_tokens=None, completion_tokens=2)


def test_a_stream_refused_upstream_fails_before_the_first_chunk(upstream: Upstream) -> None:
    upstream.reply = Reply(
        status=429, body={"error": {"message": "slow down"}}, headers={"Retry-After": "3"}
    )
    with pytest.raises(ProviderFailure) as info:
        next(make(upstream.base_url).stream(call()))
    assert (info.value.status, info.value.retry_after_s) == (429, 3.0)


@pytest.mark.parametrize(
    "pieces",
    [
        sse(delta("a")),  # ends without a finish_reason
        sse(delta("a"), {"error": {"message": "model crashed"}}),
        [b"data: {not json\n\n"],
    ],
)
def test_a_broken_stream_is_a_failure(upstream: Upstream, pieces: list[bytes]) -> None:
    upstream.reply = Reply(stream=pieces)
    with pytest.raises(ProviderFailure):
        list(make(upstream.base_url).stream(call()))


@pytest.mark.parametrize("trickle", [False, True])
def test_the_deadline_bounds_the_whole_stream(upstream: Upstream, trickle: bool) -> None:
    # A token every 20 ms for 10 s, or the same bytes one at a time: each read is quick,
    # so only a deadline on the whole stream stops it.
    events = sse(*[delta("x")] * 500)
    pieces = [bytes([b]) for b in b"".join(events)] if trickle else events
    upstream.reply = Reply(stream=pieces, pause_s=0.005 if trickle else 0.02)
    started = time.monotonic()
    with pytest.raises(ProviderTimeout, match="deadline"):
        list(make(upstream.base_url).stream(call(timeout_s=0.3)))
    assert time.monotonic() - started < 1.0


def test_closing_a_stream_closes_the_upstream_connection(upstream: Upstream) -> None:
    upstream.reply = Reply(stream=sse(*[delta("x")] * 500), pause_s=0.01)
    stream = make(upstream.base_url).stream(call())
    assert next(stream) == Chunk(text="x")
    stream.close()
    deadline = time.monotonic() + 5
    while not upstream.cut and time.monotonic() < deadline:
        time.sleep(0.01)
    assert upstream.cut, "the upstream went on writing to a closed stream"
