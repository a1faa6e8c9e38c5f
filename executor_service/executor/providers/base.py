"""The one small interface every model provider implements.

A provider turns a :class:`Call` into a :class:`Completion` or raises one of
the two provider exceptions below; the executor API maps them to 504 and 502.
Anything else a provider raises is a bug: it becomes a 500 and goes to Sentry.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .ratelimit import RateLimitInfo

from ...exceptions import ExecutorServiceError


@dataclass(frozen=True)
class Call:
    """One model call, already validated. ``deadline`` is on the ``time.monotonic`` clock."""

    messages: list[dict[str, str]]
    max_tokens: int = 256
    temperature: float = 0.0
    seed: int | None = None
    deadline: float = field(default_factory=lambda: time.monotonic() + 60.0)
    request_id: str = ""
    #: set when the client has gone away: a provider that can stop early does
    cancel: threading.Event = field(default_factory=threading.Event, compare=False)

    def remaining(self) -> float:
        """Seconds left before the deadline (may be negative)."""
        return self.deadline - time.monotonic()

    @property
    def cancelled(self) -> bool:
        return self.cancel.is_set()


@dataclass(frozen=True)
class Completion:
    output: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Chunk:
    """A piece of a streamed answer. The last chunk of a stream has ``finish_reason`` set,
    and the token counts when the provider knows them."""

    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class ProviderTimeout(ExecutorServiceError):
    """The provider did not answer before the call's deadline."""


class ProviderCancelled(ExecutorServiceError):
    """The call was stopped because its client went away (nobody reads the answer)."""


class ProviderFailure(ExecutorServiceError):
    """The provider answered with an error (HTTP status when there is one)."""

    def __init__(
        self, message: str, *, status: int | None = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.retry_after_s = retry_after_s


class ProviderRejected(ProviderFailure):
    """The provider refused this request as invalid (e.g. a prompt longer than the
    model's context): the client's fault, so no retry anywhere can succeed."""


class ProviderRateLimited(ProviderFailure):
    """The provider refused for rate ("not now"): HTTP 429 with, when it said so, how
    long to wait and its ``x-ratelimit-*`` remaining/reset values. The executor answers
    its own 429 ``rate_limited`` with them; the dispatcher defers, it does not fail."""

    def __init__(
        self,
        message: str,
        *,
        retry_after_s: float | None = None,
        limits: RateLimitInfo | None = None,
    ) -> None:
        super().__init__(message, status=429, retry_after_s=retry_after_s)
        self.limits = limits


class Provider(ABC):
    """A model backend. One instance per model per worker process."""

    #: the provider's name as written in the catalog (``llama_cpp``, ``openai``, ``simulated``)
    kind: str = ""

    def __init__(self, model: str, options: dict[str, Any]) -> None:
        self.model = model
        self.options = options

    def load(self) -> None:  # noqa: B027 - optional hook
        """Prepare for calls (load weights, open sessions). Called once per worker process."""

    @property
    def loaded(self) -> bool:
        return True

    @abstractmethod
    def complete(self, call: Call) -> Completion:
        """Run the call; raise ProviderTimeout or ProviderFailure on the expected failures."""

    def stream(self, call: Call) -> Iterator[Chunk]:
        """The answer piece by piece, as a generator: the caller closes it when the client
        goes away, and a provider releases what it holds in its ``finally``. Raises the same
        exceptions as :meth:`complete`, at any point of the iteration.

        This default yields the whole answer as one chunk; providers that can stream
        (``llama_cpp``, ``openai``, ``simulated``) override it."""
        completion = self.complete(call)
        yield Chunk(
            text=completion.output,
            finish_reason=completion.finish_reason,
            prompt_tokens=completion.prompt_tokens,
            completion_tokens=completion.completion_tokens,
        )

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources."""
