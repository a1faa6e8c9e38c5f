"""The ``openai`` provider: any OpenAI-compatible chat completions endpoint.

Ollama, vLLM, the llama.cpp server, OpenAI and Azure OpenAI all answer
``POST .../chat/completions`` with the same JSON shape; this provider sends
one such request per call over a pooled ``requests.Session``.

Options (catalog keys):
    base_url          the API root, e.g. ``http://127.0.0.1:8080/v1`` (required)
    remote_model      the model name sent upstream (default: the catalog name);
                      for ``api_style = "azure"`` it is the deployment name
    api_key_env       the NAME of the environment variable holding the key; the
                      key itself never appears in the catalog, a log or an error
    api_style         ``openai`` (``Authorization: Bearer``, the default) or
                      ``azure`` (``api-key`` header, deployment in the path)
    api_version       Azure ``api-version`` query parameter (default below)
    connect_timeout_s seconds to open a connection (default 3)
    pool_size         connections kept open to the endpoint (default 16)
    extra_headers     a table of headers added to every request

Failures map onto the provider interface: the deadline passing while waiting
for the answer is :class:`ProviderTimeout`; an unreachable endpoint, an HTTP
error or an unreadable answer is :class:`ProviderFailure`; a 429 is
:class:`ProviderRateLimited`, carrying Retry-After (or ``retry-after-ms``) and the
upstream's ``x-ratelimit-*`` remaining/reset values. There are no
retries here: retrying (with backoff, honouring Retry-After) is the
dispatcher's job, and a hidden retry would spend the caller's deadline twice.
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import requests
from requests.adapters import HTTPAdapter

from ...config import ConfigError
from .base import (
    Call,
    Chunk,
    Completion,
    Provider,
    ProviderFailure,
    ProviderRateLimited,
    ProviderTimeout,
)
from .ratelimit import limits_from_headers

logger = logging.getLogger(__name__)

API_STYLES = ("openai", "azure")
# A GA Azure OpenAI data-plane version; override per model with `api_version`.
DEFAULT_AZURE_API_VERSION = "2024-10-21"
# Enough of an upstream error message to diagnose it, short enough for a log line.
EXCERPT_CHARS = 200
KNOWN_OPTIONS = frozenset(
    {
        "base_url",
        "remote_model",
        "api_key_env",
        "api_style",
        "api_version",
        "connect_timeout_s",
        "pool_size",
        "extra_headers",
    }
)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP date; None if absent
    or unreadable. ``now`` is a Unix time (default: the current time)."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # an HTTP date is always GMT
        return None
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


def _socket_of(response: requests.Response) -> Any:
    """The socket a streamed response is read from. urllib3 keeps it on the connection,
    unless http.client dropped it there (an answer that ends with the connection): then
    only the response's file object still holds it. Private attributes, so checked by
    the provider's tests (a trickling stream must stop at the deadline)."""
    raw = response.raw
    sock = getattr(getattr(raw, "connection", None), "sock", None)
    if sock is None:
        fp = getattr(getattr(raw, "_fp", None), "fp", None)
        sock = getattr(getattr(fp, "raw", None), "_sock", None)
    return sock


def _shut_down(sock: Any) -> None:
    """End any read blocked on this socket (from another thread)."""
    if sock is None:
        return
    with contextlib.suppress(OSError):  # already closed: nothing is blocked on it
        sock.shutdown(socket.SHUT_RDWR)


def _error_excerpt(response: requests.Response) -> str:
    """The upstream's own error message if the body has one, else the start of the body."""
    text = response.text or ""
    message: Any = None
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            message = error.get("message")
        elif isinstance(error, str):  # Ollama: {"error": "..."}
            message = error
        if message is None:
            message = body.get("message") or body.get("detail")
    if not isinstance(message, str) or not message.strip():
        message = text
    message = " ".join(message.split())
    if len(message) > EXCERPT_CHARS:
        message = message[: EXCERPT_CHARS - 3] + "..."
    return message or "(empty body)"


class OpenAIProvider(Provider):
    """Chat completions over HTTP. Thread-safe and gevent-friendly: requests' pooled
    session is shared by every call of this worker process."""

    kind = "openai"

    def __init__(self, model: str, options: dict[str, Any]) -> None:
        super().__init__(model, options)
        base_url = options.get("base_url")
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"openai model {model!r}: base_url must be an http(s) URL")
        self.base_url = base_url.rstrip("/")
        self.remote_model = str(options.get("remote_model") or model)
        self.api_style = str(options.get("api_style", "openai"))
        if self.api_style not in API_STYLES:
            raise ConfigError(
                f"openai model {model!r}: api_style must be one of {', '.join(API_STYLES)}"
            )
        self.api_version = str(options.get("api_version", DEFAULT_AZURE_API_VERSION))
        self.api_key_env = options.get("api_key_env")
        if self.api_key_env is not None and not isinstance(self.api_key_env, str):
            raise ConfigError(f"openai model {model!r}: api_key_env must be a variable name")
        try:
            self.connect_timeout_s = float(options.get("connect_timeout_s", 3.0))
            self.pool_size = int(options.get("pool_size", 16))
        except (TypeError, ValueError):
            raise ConfigError(
                f"openai model {model!r}: connect_timeout_s and pool_size must be numbers"
            ) from None
        if self.connect_timeout_s <= 0 or self.pool_size <= 0:
            raise ConfigError(
                f"openai model {model!r}: connect_timeout_s and pool_size must be > 0"
            )
        extra = options.get("extra_headers", {})
        if not isinstance(extra, dict):
            raise ConfigError(f"openai model {model!r}: extra_headers must be a table")
        self.extra_headers = {str(k): str(v) for k, v in extra.items()}
        unknown = sorted(set(options) - KNOWN_OPTIONS)
        if unknown:
            logger.warning(
                "openai model %r: ignoring unknown options %s", model, ", ".join(unknown)
            )
        if self.api_style == "azure":
            deployment = quote(self.remote_model, safe="")
            self.url = f"{self.base_url}/openai/deployments/{deployment}/chat/completions"
            self.params: dict[str, str] = {"api-version": self.api_version}
        else:
            self.url = f"{self.base_url}/chat/completions"
            self.params = {}
        self._api_key: str | None = None
        self._session: requests.Session | None = None

    def load(self) -> None:
        """Read the key from the environment and open the pooled session."""
        if self.api_key_env:
            key = os.environ.get(self.api_key_env, "").strip()  # secret files end in \n
            if not key:
                raise ConfigError(
                    f"openai model {self.model!r}: environment variable {self.api_key_env} "
                    "(api_key_env) is not set"
                )
            self._api_key = key
        session = requests.Session()
        # One pool for this endpoint; no urllib3 retries (the dispatcher retries).
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=self.pool_size, max_retries=0)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        session.headers.update({"Accept": "application/json", **self.extra_headers})
        if self._api_key:
            if self.api_style == "azure":
                session.headers["api-key"] = self._api_key
            else:
                session.headers["Authorization"] = f"Bearer {self._api_key}"
        self._session = session

    @property
    def loaded(self) -> bool:
        return self._session is not None

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None

    def _redact(self, text: str) -> str:
        """Never let the key reach an error message, even if the upstream echoes it."""
        if self._api_key:
            text = text.replace(self._api_key, "***")
        return text

    def _payload(self, call: Call) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "messages": call.messages,
            "max_tokens": call.max_tokens,
            "temperature": call.temperature,
        }
        if self.api_style == "openai":  # Azure takes the model from the deployment in the URL
            payload["model"] = self.remote_model
        if call.seed is not None:
            payload["seed"] = call.seed
        return payload

    def complete(self, call: Call) -> Completion:
        response = self._send(call, self._payload(call), stream=False)
        with response:
            if response.status_code != 200:
                raise self._http_failure(response)
            return self._parse(response)

    def stream(self, call: Call) -> Iterator[Chunk]:
        """The upstream's own server-sent events, re-read as chunks. The deadline bounds
        the whole stream: before each read the socket's timeout is set to what is left,
        so a slow trickle of bytes cannot stretch it. Closing this generator (the client
        went away) closes the upstream response, which the upstream sees as a cancel."""
        payload = self._payload(call)
        payload["stream"] = True
        # OpenAI, vLLM, Ollama and llama_cpp.server send usage in a last chunk when asked.
        payload["stream_options"] = {"include_usage": True}
        response = self._send(call, payload, stream=True)
        with response:
            if response.status_code != 200:
                raise self._http_failure(response)
            yield from self._read_stream(call, response)

    def _send(self, call: Call, payload: dict[str, Any], *, stream: bool) -> requests.Response:
        """POST the payload, the deadline bounding the connection and each read."""
        if self._session is None:
            self.load()
        session = self._session
        assert session is not None
        remaining = call.remaining()
        if remaining <= 0:
            raise ProviderTimeout("the deadline passed before the request was sent")
        connect_timeout = min(self.connect_timeout_s, remaining)
        try:
            # The read timeout bounds each wait for bytes; a non-streaming answer arrives
            # all at once at the end, so this is the deadline for the whole answer.
            # call.request_id is not sent as X-Request-ID: llama_cpp.server (starlette-context)
            # answers an empty 400 to any X-Request-ID that is not a UUID.
            return session.post(
                self.url,
                params=self.params,
                json=payload,
                timeout=(connect_timeout, remaining),
                stream=stream,
                # A redirect would turn the POST into a GET and could carry the key elsewhere.
                allow_redirects=False,
            )
        except requests.ConnectTimeout:
            # ConnectTimeout is both a Timeout and a ConnectionError: it is the deadline
            # only if the deadline (not connect_timeout_s) bounded the attempt.
            if connect_timeout < self.connect_timeout_s:
                raise ProviderTimeout(
                    f"no connection to {self.base_url} before the deadline"
                ) from None
            raise ProviderFailure(
                f"cannot connect to {self.base_url}: no connection within "
                f"{self.connect_timeout_s:g} s"
            ) from None
        except requests.Timeout:
            raise ProviderTimeout(
                f"{self.base_url} did not answer within {remaining:.3g} s"
            ) from None
        except requests.ConnectionError as exc:
            logger.warning("openai %s: connection failed: %s", self.model, type(exc).__name__)
            raise ProviderFailure(f"cannot connect to {self.base_url}") from None
        except requests.RequestException as exc:
            raise ProviderFailure(
                f"request to {self.base_url} failed: {type(exc).__name__}"
            ) from None

    def _read_stream(self, call: Call, response: requests.Response) -> Iterator[Chunk]:
        # A read timeout bounds each wait for bytes, not the stream: an upstream that
        # trickles a byte now and then would never time out. At the deadline a timer
        # shuts the socket down, which ends the blocked read at once (as an end of stream
        # or an error; either way the deadline has passed and this is a timeout).
        watchdog = threading.Timer(
            max(0.0, call.remaining()), _shut_down, args=(_socket_of(response),)
        )
        watchdog.daemon = True
        watchdog.start()
        try:
            yield from self._events(call, response)
        except ProviderFailure:
            if call.remaining() <= 0:
                raise ProviderTimeout(
                    f"{self.base_url} was still streaming at the deadline"
                ) from None
            raise
        finally:
            watchdog.cancel()

    def _events(self, call: Call, response: requests.Response) -> Iterator[Chunk]:
        lines = response.iter_lines()
        data: list[bytes] = []
        finish_reason: str | None = None
        prompt_tokens = completion_tokens = None
        deltas = 0
        while True:
            if call.remaining() <= 0:
                raise ProviderTimeout(f"{self.base_url} was still streaming at the deadline")
            try:
                line = next(lines, None)
            except requests.RequestException as exc:
                raise ProviderFailure(
                    f"the stream from {self.base_url} broke: {type(exc).__name__}"
                ) from None
            if line is None:
                break
            # Server-sent events: "data:" lines make up an event, a blank line ends it;
            # comments (":") and other fields (event, id, retry) carry nothing we use.
            if line.startswith(b"data:"):
                data.append(line[5:].removeprefix(b" "))
                continue
            if line or not data:
                continue
            event, data = b"\n".join(data), []
            if event.strip() == b"[DONE]":
                break
            body = self._event_json(event)
            usage = body.get("usage")
            if isinstance(usage, dict):
                prompt_tokens = usage.get("prompt_tokens")
                completion_tokens = usage.get("completion_tokens")
            for choice in body.get("choices") or []:
                if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                    continue
                delta = choice.get("delta") or {}
                text = delta.get("content") if isinstance(delta, dict) else None
                if isinstance(text, str) and text:
                    deltas += 1
                    yield Chunk(text=text)
                if isinstance(choice.get("finish_reason"), str):
                    finish_reason = choice["finish_reason"]
        if finish_reason is None:
            raise ProviderFailure(f"the stream from {self.base_url} ended without a finish_reason")
        # Servers that ignore stream_options (llama_cpp.server) send no usage: the
        # completion is then counted as its deltas (one token each on those servers)
        # and the prompt as unknown (0).
        yield Chunk(
            finish_reason=finish_reason,
            prompt_tokens=prompt_tokens if isinstance(prompt_tokens, int) else None,
            completion_tokens=completion_tokens if isinstance(completion_tokens, int) else deltas,
        )

    def _event_json(self, event: bytes) -> dict[str, Any]:
        try:
            body = json.loads(event)
        except ValueError:
            raise ProviderFailure(f"malformed event in the stream from {self.base_url}") from None
        if not isinstance(body, dict):
            raise ProviderFailure(f"malformed event in the stream from {self.base_url}")
        error = body.get("error")
        if error:
            message = error.get("message") if isinstance(error, dict) else str(error)
            raise ProviderFailure(
                f"upstream failed during the stream: {self._redact(str(message))[:EXCERPT_CHARS]}"
            )
        return body

    def _http_failure(self, response: requests.Response) -> ProviderFailure:
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        if retry_after is None:
            # Azure OpenAI and OpenAI also send milliseconds.
            ms = parse_retry_after(response.headers.get("retry-after-ms"))
            retry_after = ms / 1000 if ms is not None else None
        excerpt = self._redact(_error_excerpt(response))
        reason = f" {response.reason}" if response.reason else ""
        if response.status_code == 429:
            limits = limits_from_headers(response.headers)
            return ProviderRateLimited(
                f"upstream answered HTTP 429{reason}: {excerpt}",
                retry_after_s=retry_after if retry_after is not None else limits.wait_s(),
                limits=None if limits.empty else limits,
            )
        return ProviderFailure(
            f"upstream answered HTTP {response.status_code}{reason}: {excerpt}",
            status=response.status_code,
            retry_after_s=retry_after,
        )

    def _parse(self, response: requests.Response) -> Completion:
        try:
            body = response.json()
        except ValueError:
            raise ProviderFailure(
                f"malformed answer from {self.base_url}: not JSON "
                f"({self._redact(_error_excerpt(response))})"
            ) from None
        try:
            choice = body["choices"][0]
            content = choice["message"].get("content")
            finish_reason = choice.get("finish_reason") or "stop"
            usage = body.get("usage") or {}
            prompt_tokens = int(usage.get("prompt_tokens") or 0)
            completion_tokens = int(usage.get("completion_tokens") or 0)
        except (KeyError, IndexError, TypeError, AttributeError, ValueError) as exc:
            raise ProviderFailure(
                f"malformed answer from {self.base_url}: no choices[0].message "
                f"({type(exc).__name__})"
            ) from None
        if content is None:  # e.g. a content filter stopped it; the finish_reason says why
            content = ""
        if not isinstance(content, str) or not isinstance(finish_reason, str):
            raise ProviderFailure(
                f"malformed answer from {self.base_url}: content or finish_reason is not a string"
            )
        return Completion(
            output=content,
            finish_reason=finish_reason,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
        )
