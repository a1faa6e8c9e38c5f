"""The ``openai`` provider against a real HTTP server that rate-limits as OpenAI does:
a token bucket of requests and tokens per window, 429 with Retry-After,
``x-ratelimit-*`` headers and OpenAI's error body beyond it; and the executor's own
429 ``rate_limited`` for it through ``POST /execute``."""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import write_catalog
from werkzeug.serving import BaseWSGIServer, make_server
from werkzeug.wrappers import Request, Response

from executor_service import create_app
from executor_service.config import Settings
from executor_service.executor.providers import Call, ProviderRateLimited, create_provider
from executor_service.executor.providers.openai import OpenAIProvider
from executor_service.executor.providers.ratelimit import TokenBucket, parse_duration

RPM = 3
TPM = 10_000
WINDOW_S = 60.0


class RateLimitedUpstream:
    """``POST /v1/chat/completions`` behind a token bucket; ``send_retry_after`` False
    leaves only the reset headers to say when to come back (as some deployments do)."""

    def __init__(self) -> None:
        self.bucket = TokenBucket(RPM, TPM, WINDOW_S)
        self.send_retry_after = True
        self.arrivals: list[bool] = []

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        request = Request(environ)
        body = request.get_json(silent=True) or {}
        chars = sum(len(m.get("content", "")) for m in body.get("messages", []))
        cost = chars // 4 + int(body.get("max_tokens") or 16)
        admission = self.bucket.acquire(cost)
        self.arrivals.append(admission.admitted)
        headers = admission.info.headers()
        if not admission.admitted:
            if self.send_retry_after:
                headers["Retry-After"] = str(math.ceil(admission.retry_after_s))
            error = {
                "message": f"Rate limit reached for requests: Limit {RPM}, Used {RPM}.",
                "type": "requests",
                "code": "rate_limit_exceeded",
            }
            response = Response(
                json.dumps({"error": error}), 429, headers, mimetype="application/json"
            )
            return response(environ, start_response)
        answer = {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "4"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": chars // 4, "completion_tokens": 1},
        }
        response = Response(json.dumps(answer), 200, headers, mimetype="application/json")
        return response(environ, start_response)


@pytest.fixture
def upstream() -> Iterator[tuple[RateLimitedUpstream, str]]:
    app = RateLimitedUpstream()
    server: BaseWSGIServer = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield app, f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()
    thread.join(timeout=10)


def ask() -> Call:
    return Call(messages=[{"role": "user", "content": "What is 2+2?"}], max_tokens=8)


def test_the_provider_reports_the_upstream_rate_limit(
    upstream: tuple[RateLimitedUpstream, str],
) -> None:
    server, url = upstream
    provider = create_provider("openai", "gpt-limited", {"base_url": url})
    assert isinstance(provider, OpenAIProvider)
    provider.load()
    try:
        for _ in range(RPM):
            assert provider.complete(ask()).output == "4"
        with pytest.raises(ProviderRateLimited) as info:
            provider.complete(ask())
        refused = info.value
        assert refused.status == 429
        assert "Rate limit reached" in refused.message
        assert refused.retry_after_s == 20.0  # one of 3 per minute refills in 20 s
        assert refused.limits is not None
        assert refused.limits.remaining_requests == 0
        assert refused.limits.limit_requests == RPM
        assert refused.limits.limit_tokens == TPM
        assert refused.limits.reset_requests_s == pytest.approx(WINDOW_S, abs=1.0)

        server.send_retry_after = False  # only the reset headers say when
        with pytest.raises(ProviderRateLimited) as info:
            provider.complete(ask())
        assert info.value.retry_after_s == pytest.approx(WINDOW_S, abs=1.0)
    finally:
        provider.close()
    assert server.arrivals == [True] * RPM + [False, False]


def test_the_executor_answers_the_upstream_limit_as_its_own_429(
    upstream: tuple[RateLimitedUpstream, str], tmp_path: Path
) -> None:
    _, url = upstream
    catalog = write_catalog(
        tmp_path / "catalog.toml", {"gpt-limited": {"provider": "openai", "base_url": url}}
    )
    settings = Settings.from_env(environ={"ES_CATALOG": str(catalog), "ES_REGION": "it"})
    app = create_app({"TESTING": True}, settings=settings)
    client = app.test_client()
    try:
        body = {"model": "gpt-limited", "prompt": "What is 2+2?", "max_tokens": 8}
        statuses = [client.post("/execute", json=body).status_code for _ in range(RPM)]
        assert statuses == [200] * RPM
        r = client.post("/execute", json=body)
    finally:
        app.extensions["executor"].catalog.close()
    assert r.status_code == 429
    error = r.get_json()["error"]
    assert error["code"] == "rate_limited"
    assert "Rate limit reached" in error["message"]
    assert error["details"]["provider"] == "openai"
    assert error["details"]["provider_status"] == 429
    assert error["details"]["retry_after_s"] == 20
    assert error["details"]["ratelimit"]["remaining_requests"] == 0
    assert error["details"]["ratelimit"]["limit_tokens"] == TPM
    assert r.headers["Retry-After"] == "20"
    assert r.headers["x-ratelimit-remaining-requests"] == "0"
    assert r.headers["x-ratelimit-limit-requests"] == str(RPM)
    reset = parse_duration(r.headers["x-ratelimit-reset-requests"])
    assert reset is not None and 0 < reset <= WINDOW_S
