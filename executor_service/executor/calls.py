"""The one call path under every executor surface (``/execute`` and ``/v1/chat/completions``).

A surface validates its own request shape, builds a :class:`ModelCall` and
renders the outcome in its own response shape; everything between is here,
once: the catalog look-up, the deadline (the client's ``timeout_s`` capped by
the server), the admission slot, the provider call, the mapping of provider
failures to the contract's errors, and the metrics and the log line of the
call. A streamed call holds its admission slot, and stays under its deadline,
until its last chunk is written or the client goes away.
"""

from __future__ import annotations

import logging
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import sentry_sdk
from flask import current_app, g, request

from ..errors import APIError, ClientGone, UnknownModel
from .metrics import model_seconds_of, request_seconds_of, requests_of
from .provider_errors import api_error
from .providers import (
    Call,
    Chunk,
    Completion,
    ProviderCancelled,
    ProviderFailure,
    ProviderTimeout,
)

logger = logging.getLogger(__name__)

#: the status recorded in the metrics for a stream whose client went away before its end
#: (nginx's "client closed request"; no response status was ever sent for it).
CLIENT_CLOSED = 499


@dataclass(frozen=True)
class ModelCall:
    """One validated model call, whatever surface it came in by."""

    model: str
    messages: list[dict[str, str]]
    max_tokens: int
    temperature: float
    seed: int | None
    timeout_s: float | None
    request_id: str
    #: the request field a prompt the model refuses is reported on (``prompt``, ``messages``)
    input_field: str = "messages"


@dataclass(frozen=True)
class Outcome:
    """A finished call: what the provider answered and where the time went."""

    provider: str
    completion: Completion
    started: float
    model_started: float
    finished: float

    def timing(self) -> dict[str, float]:
        return {
            "queue_ms": round((self.model_started - self.started) * 1000, 3),
            "model_ms": round((self.finished - self.model_started) * 1000, 3),
            "total_ms": round((self.finished - self.started) * 1000, 3),
        }


def _state() -> Any:
    return current_app.extensions["executor"]


def _prepare(mc: ModelCall) -> tuple[Any, Call, float]:
    """Check the model, tag the request, and fix the deadline."""
    st = _state()
    g.request_id = mc.request_id
    if mc.model not in st.catalog:
        raise UnknownModel(
            f"model {mc.model!r} is not in the catalog",
            details={"model": mc.model, "available": st.catalog.names()},
        )
    g.model = mc.model
    if sentry_sdk.is_initialized():  # without a DSN the tag would go nowhere, at a cost (E1)
        sentry_sdk.set_tag("model", mc.model)
    cap = st.settings.timeout_cap_s
    budget = min(mc.timeout_s or cap, cap)
    call = Call(
        messages=mc.messages,
        max_tokens=mc.max_tokens,
        temperature=mc.temperature,
        seed=mc.seed,
        deadline=time.monotonic() + budget,
        request_id=mc.request_id,
    )
    return st, call, budget


def _api_error(exc: Exception, mc: ModelCall, provider_kind: str, budget: float) -> APIError:
    """The contract's error for a provider exception (``provider_errors``, for every surface)."""
    assert isinstance(exc, ProviderTimeout | ProviderFailure)
    return api_error(
        exc, provider=provider_kind, model=mc.model, timeout_s=budget, field=mc.input_field
    )


def _watch_client(cancel: threading.Event) -> Callable[[], None]:
    """Set ``cancel`` if the client closes its connection while the call runs; returns
    the function that stops watching.

    Under gevent (the default worker) a greenlet peeks at the client's socket: the
    client sends nothing while it waits for its answer, so the socket turns readable
    only when it is closed (recv gives b""). The llama_cpp and simulated providers
    then stop within a token; nobody would read their answer. Under gthread (no
    spare thread to watch with) calls run to their deadline, as before.
    """
    sock = request.environ.get("gunicorn.socket")
    monkey = sys.modules.get("gevent.monkey")
    if sock is None or monkey is None or not monkey.is_module_patched("socket"):
        return lambda: None
    import gevent

    rid = g.get("request_id")  # the greenlet below runs outside the request context

    def watch() -> None:
        try:
            data = sock.recv(1, socket.MSG_PEEK)
        except OSError:
            data = b""
        if not data:
            logger.info("client gone: stopping the call", extra={"request_id": rid})
            cancel.set()

    watcher = gevent.spawn(watch)
    # block: the watcher must be gone before gunicorn reads the next request on the socket
    # (two greenlets waiting on one socket is an error, answered 500 on keep-alive)
    return lambda: watcher.kill(block=True)


def run_call(mc: ModelCall) -> Outcome:
    """Run one call to its end under an admission slot; raise the contract's errors.
    The request's metrics and log line are written by :func:`observe_response`."""
    started = g.started
    st, call, budget = _prepare(mc)
    with st.admission.slot():
        provider = st.catalog.provider(mc.model)
        model_started = time.monotonic()
        stop_watching = _watch_client(call.cancel)
        try:
            completion = provider.complete(call)
        except ProviderCancelled as exc:
            raise ClientGone(details={"reason": str(exc)}) from None
        except (ProviderTimeout, ProviderFailure) as exc:
            raise _api_error(exc, mc, provider.kind, budget) from None
        finally:
            stop_watching()
            model_seconds_of(mc.model).observe(time.monotonic() - model_started)
    finished = time.monotonic()
    g.model_ms = (finished - model_started) * 1000
    return Outcome(provider.kind, completion, started, model_started, finished)


@dataclass
class Stream:
    """A streamed call, started: its first chunk is already read, so a call that fails
    at once (overloaded, rate-limited upstream, prompt too long) is still answered with
    its own status code. Iterate it for the chunks (the contract's errors are raised
    from the iteration), and always :meth:`close` it: that releases the provider, the
    admission slot, and records the call's metrics and log line."""

    mc: ModelCall
    provider: str
    started: float
    model_started: float
    budget: float
    deadline: float
    tenant: str | None
    _chunks: Iterator[Chunk]
    _first: Chunk | None
    _stack: ExitStack
    status: int = CLIENT_CLOSED
    finished: bool = False
    usage: tuple[int, int] = (0, 0)
    _closed: bool = field(default=False, repr=False)

    def __iter__(self) -> Iterator[Chunk]:
        first, self._first = self._first, None
        try:
            if first is not None:
                if first.finish_reason is not None:
                    self._finish(first)
                yield first
                if self.finished:
                    return
            for chunk in self._chunks:
                if time.monotonic() > self.deadline:
                    # A provider that does not watch the deadline itself still stops here.
                    raise ProviderTimeout("the stream passed the deadline")
                if chunk.finish_reason is not None:
                    self._finish(chunk)
                yield chunk
                if self.finished:
                    return
            raise ProviderFailure("the stream ended without a finish_reason")
        except (ProviderTimeout, ProviderFailure) as exc:
            err = _api_error(exc, self.mc, self.provider, self.budget)
            self.status = err.status
            raise err from None
        except Exception:
            self.status = 500  # a bug: the caller logs it and ends the stream
            raise

    def _finish(self, chunk: Chunk) -> None:
        self.status, self.finished = 200, True
        self.usage = (chunk.prompt_tokens or 0, chunk.completion_tokens or 0)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        close = getattr(self._chunks, "close", None)
        try:
            if close is not None:
                close()
        finally:
            self._stack.close()  # the admission slot
            ended = time.monotonic()
            model_seconds_of(self.mc.model).observe(ended - self.model_started)
            record(
                self.mc.model,
                self.status,
                ended - self.started,
                request_id=self.mc.request_id,
                model_ms=(ended - self.model_started) * 1000,
                tenant=self.tenant,
                stream=True,
            )


def open_stream(mc: ModelCall) -> Stream:
    """Take an admission slot and start the provider's stream; see :class:`Stream`."""
    started = g.started
    st, call, budget = _prepare(mc)
    stack = ExitStack()
    stack.enter_context(st.admission.slot())
    provider = st.catalog.provider(mc.model)
    model_started = time.monotonic()
    chunks = provider.stream(call)
    try:
        first = next(chunks, None)
    except (ProviderTimeout, ProviderFailure) as exc:
        stack.close()
        model_seconds_of(mc.model).observe(time.monotonic() - model_started)
        raise _api_error(exc, mc, provider.kind, budget) from None
    except BaseException:
        stack.close()
        raise
    g.streamed = True  # observe_response leaves the metrics to Stream.close
    return Stream(
        mc=mc,
        provider=provider.kind,
        started=started,
        model_started=model_started,
        budget=budget,
        deadline=call.deadline,
        tenant=g.get("tenant"),
        _chunks=chunks,
        _first=first,
        _stack=stack,
    )


def record(
    model: str,
    status: int,
    total_s: float,
    *,
    request_id: str | None,
    model_ms: float,
    tenant: str | None,
    stream: bool = False,
) -> None:
    """The metrics and the log line of one call, whichever surface answered it."""
    requests_of(model, status).inc()
    request_seconds_of(model).observe(total_s)
    if not logger.isEnabledFor(logging.INFO):
        return
    logger.info(
        "execute",
        extra={
            "request_id": request_id,
            "model": model,
            "status": status,
            "total_ms": round(total_s * 1000, 3),
            "model_ms": round(model_ms, 3),
            "tenant": tenant,
            "stream": stream,
        },
    )
