"""How a provider's failure becomes the error a client sees, in one place for every
route that runs a model call (``POST /execute`` and the OpenAI-compatible surface).

- the deadline passed: 504 ``model_timeout``;
- the provider refused the request as invalid: 422 ``validation_error``;
- the provider refused for rate (:class:`ProviderRateLimited`, or any failure whose
  HTTP status is 429): 429 ``rate_limited`` with ``Retry-After`` (whole seconds, at
  least 1), ``retry-after-ms``, the provider's ``x-ratelimit-*`` values as headers,
  and in ``details`` the provider, ``provider_status``, ``retry_after_s`` and
  ``ratelimit`` (remaining/reset/limit per requests and tokens);
- any other failure: 502 ``provider_error`` with ``provider_status`` and, when the
  provider sent one, ``retry_after_s`` and ``Retry-After``.
"""

from __future__ import annotations

import math
from typing import Any

from ..errors import APIError, ModelTimeout, ProviderError, RateLimited, ValidationFailed
from .providers import ProviderFailure, ProviderRateLimited, ProviderRejected, ProviderTimeout

# When a provider refuses for rate and says nothing about when to come back.
DEFAULT_RATE_LIMIT_RETRY_S = 1.0


def retry_after_header(seconds: float) -> str:
    """Retry-After in whole seconds, rounded up, at least 1 (never "come back now")."""
    return str(max(1, math.ceil(seconds)))


def api_error(
    exc: ProviderTimeout | ProviderFailure,
    *,
    provider: str,
    model: str,
    timeout_s: float,
    field: str = "prompt",
) -> APIError:
    """The client's error for a provider exception raised while running ``model``."""
    if isinstance(exc, ProviderTimeout):
        return ModelTimeout(
            f"model {model!r} did not answer within {timeout_s:g} s",
            details={"timeout_s": timeout_s, "reason": str(exc)},
        )
    if isinstance(exc, ProviderRejected):
        return ValidationFailed(details={field: [exc.message]})
    details: dict[str, Any] = {"provider": provider, "provider_status": exc.status}
    headers: dict[str, str] = {}
    if isinstance(exc, ProviderRateLimited) or exc.status == 429:
        limits = exc.limits if isinstance(exc, ProviderRateLimited) else None
        wait = exc.retry_after_s
        if wait is None and limits is not None:
            wait = limits.wait_s()
        wait = DEFAULT_RATE_LIMIT_RETRY_S if wait is None else wait
        details.update(provider_status=429, retry_after_s=round(wait, 3))
        headers["Retry-After"] = retry_after_header(wait)
        headers["retry-after-ms"] = str(math.ceil(wait * 1000))
        if limits is not None and not limits.empty:
            details["ratelimit"] = limits.details()
            headers.update(limits.headers())
        return RateLimited(
            f"provider {provider} refused model {model!r} for rate: {exc.message}",
            details=details,
            headers=headers,
        )
    if exc.retry_after_s is not None:
        details["retry_after_s"] = exc.retry_after_s
        headers["Retry-After"] = retry_after_header(exc.retry_after_s)
    return ProviderError(
        f"provider {provider} failed: {exc.message}", details=details, headers=headers
    )
