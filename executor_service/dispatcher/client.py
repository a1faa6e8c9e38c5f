"""The executor client: one pooled HTTP session per region, and the classification of
every call's outcome into success, retryable or fatal.

Deferred (backpressure, not failure: see ``pacing.py``): a 429 (the executor's
``rate_limited``), any error whose ``details.provider_status`` is 429, and 503
``overloaded``; the Retry-After and the provider's ``details.ratelimit`` values say
how long to wait. Retryable: the executor could not be reached or did not answer
in time, or it answered 408 or 5xx (502 provider_error, 504 model_timeout); a
Retry-After header (seconds or HTTP date) or the error's ``details.retry_after_s``
is passed on as the backoff floor. Fatal: any other 4xx (the request itself is
wrong; repeating it cannot help), which dead-letters the execution.
"""

from __future__ import annotations

import email.utils
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

import requests
from requests.adapters import HTTPAdapter

from .pacing import is_backpressure
from .regions import Region
from .scheduler import CallVerdict

logger = logging.getLogger(__name__)

# Connecting to a healthy executor takes milliseconds; a region that cannot
# accept a connection in this long is as good as down.
CONNECT_TIMEOUT_S = 5.0
# The executor answers 504 itself at timeout_s; wait a little longer so that
# answer (with its details) arrives instead of our own read timeout.
READ_MARGIN_S = 5.0
# Error messages from a misbehaving server are truncated before they are stored.
MAX_MESSAGE_CHARS = 500
RETRYABLE_4XX = frozenset({408, 429})


class Outcome(StrEnum):
    SUCCESS = "success"
    RETRYABLE = "retryable"  # try again later, maybe elsewhere
    DEFERRED = "deferred"  # backpressure: not now (never an attempt, never a strike)
    FATAL = "fatal"  # dead-letter: the request is wrong


@dataclass(frozen=True)
class CallResult:
    """One call's outcome: the executor's 200 body, or an error record for the store."""

    outcome: Outcome
    body: dict[str, Any] | None = None
    # {"code", "message", "status"?, "retry_after_s"?}: stored with the attempt
    error: dict[str, Any] | None = None
    retry_after_s: float | None = None
    elapsed_s: float = 0.0
    reused: bool = False  # an earlier identical call's answer (reuse.py): no call was made

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.SUCCESS

    @property
    def verdict(self) -> CallVerdict:
        """What this call says about its region's health (for the circuit breaker)."""
        if self.outcome is Outcome.SUCCESS:
            return CallVerdict.HEALTHY
        if self.outcome is Outcome.RETRYABLE:
            return CallVerdict.UNHEALTHY
        return CallVerdict.NEUTRAL  # a deferral or a wrong request: the region is fine


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date; None if absent
    or unreadable (a bad header must not break the retry path)."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        return max(0.0, when.timestamp() - now)
    return seconds if seconds >= 0 else None


def classify_response(
    response: requests.Response, now: float, elapsed_s: float = 0.0
) -> CallResult:
    """Turn an HTTP response from ``POST /execute`` into a CallResult."""
    status = response.status_code
    try:
        payload = response.json()
    except ValueError:
        payload = None
    if status == 200:
        if isinstance(payload, dict) and isinstance(payload.get("output"), str):
            return CallResult(Outcome.SUCCESS, body=payload, elapsed_s=elapsed_s)
        return CallResult(
            Outcome.RETRYABLE,
            error={
                "code": "bad_response",
                "message": "200 without a JSON body holding an output",
                "status": status,
            },
            elapsed_s=elapsed_s,
        )
    err = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(err, dict):
        code = str(err.get("code") or f"http_{status}")
        message = str(err.get("message") or "")
        raw_details = err.get("details")
        details: dict[str, Any] = raw_details if isinstance(raw_details, dict) else {}
    else:
        code = f"http_{status}"
        message = (response.text or response.reason or "")[:MAX_MESSAGE_CHARS]
        details = {}
    retry_after = parse_retry_after(response.headers.get("Retry-After"), now)
    detail_retry = details.get("retry_after_s") if details else None
    if isinstance(detail_retry, int | float) and not isinstance(detail_retry, bool):
        retry_after = float(detail_retry)  # more precise than the header's whole seconds
    error: dict[str, Any] = {"code": code, "message": message[:MAX_MESSAGE_CHARS], "status": status}
    if details.get("provider_status") is not None:
        error["provider_status"] = details["provider_status"]
    if retry_after is not None:
        error["retry_after_s"] = retry_after
    if isinstance(details.get("ratelimit"), dict):
        error["ratelimit"] = details["ratelimit"]
    if is_backpressure(status, code, details.get("provider_status")):
        outcome = Outcome.DEFERRED
    elif status >= 500 or status in RETRYABLE_4XX:
        outcome = Outcome.RETRYABLE
    else:
        outcome = Outcome.FATAL
    return CallResult(outcome, error=error, retry_after_s=retry_after, elapsed_s=elapsed_s)


class Caller(Protocol):
    """What a region worker needs of its executor client (tests pass fakes)."""

    def execute(
        self, model: str, prompt: str, request_id: str, params: dict[str, Any]
    ) -> CallResult: ...

    def close(self) -> None: ...


class ExecutorClient:
    """Calls one region's executor over a pooled session sized to the region's slots."""

    def __init__(
        self,
        region: Region,
        api_key: str | None = None,
        session: requests.Session | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.region = region
        self.clock = clock
        self.session = session or requests.Session()
        if session is None:
            # One connection per slot, kept alive; no urllib3 retries: retrying is
            # the dispatcher's decision, made with the whole system in view.
            adapter = HTTPAdapter(
                pool_connections=1, pool_maxsize=max(1, region.concurrency), max_retries=0
            )
            self.session.mount("http://", adapter)
            self.session.mount("https://", adapter)
        self.session.headers["Content-Type"] = "application/json"
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"
        self.url = f"{region.url}/execute"

    def request_body(
        self, model: str, prompt: str, request_id: str, params: Mapping[str, Any]
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": model,
            "request_id": request_id,
            "timeout_s": float(params.get("timeout_s") or self.region.timeout_s),
        }
        # a question given as chat messages (or with a system prompt) is sent as them
        if params.get("messages"):
            body["messages"] = params["messages"]
        else:
            body["prompt"] = prompt
        for name in ("max_tokens", "temperature", "seed"):
            if params.get(name) is not None:
                body[name] = params[name]
        return body

    def execute(
        self, model: str, prompt: str, request_id: str, params: Mapping[str, Any]
    ) -> CallResult:
        """One ``POST /execute``; never raises for what the network or server does."""
        body = self.request_body(model, prompt, request_id, params)
        started = time.monotonic()
        try:
            response = self.session.post(
                self.url,
                json=body,
                timeout=(CONNECT_TIMEOUT_S, body["timeout_s"] + READ_MARGIN_S),
                headers={"X-Request-ID": request_id},
            )
        except requests.Timeout as exc:
            return self._transport_error("timeout", f"no answer from {self.url}: {exc}", started)
        except requests.ConnectionError as exc:
            return self._transport_error(
                "connection_error", f"cannot reach {self.url}: {_short(exc)}", started
            )
        except requests.RequestException as exc:
            return self._transport_error("request_error", f"{self.url}: {_short(exc)}", started)
        return classify_response(response, self.clock(), time.monotonic() - started)

    def _transport_error(self, code: str, message: str, started: float) -> CallResult:
        return CallResult(
            Outcome.RETRYABLE,
            error={"code": code, "message": message[:MAX_MESSAGE_CHARS]},
            elapsed_s=time.monotonic() - started,
        )

    def close(self) -> None:
        self.session.close()


def _short(exc: Exception) -> str:
    """The innermost reason of a requests/urllib3 error, without the pool's noise."""
    reason: BaseException = exc
    while reason.args and isinstance(reason.args[0], BaseException):
        reason = reason.args[0]
    inner = getattr(reason, "reason", None)
    if isinstance(inner, BaseException):
        reason = inner
    return str(reason) or type(reason).__name__
