"""Rate limits the way providers express them: a token bucket of requests and tokens
per window, and the ``x-ratelimit-*`` headers that report it.

Two users:

- the ``simulated`` provider's rate-limit mode (:class:`TokenBucket`, optionally
  kept in a file under an exclusive lock so every gunicorn worker of a replica
  draws from one bucket: a provider's limit is per deployment, not per process);
- the ``openai`` provider, which reads an upstream's headers
  (:func:`limits_from_headers`) so the executor can pass them on in its own
  ``429 rate_limited`` answer.

OpenAI's names are the reference: ``x-ratelimit-limit-requests``,
``x-ratelimit-remaining-requests``, ``x-ratelimit-reset-requests`` (a duration such
as ``1s``, ``6m0s`` or ``20ms``) and the same three for ``-tokens``. Azure OpenAI
sends the ``remaining`` pair and ``retry-after-ms``.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

Clock = Callable[[], float]

# "6m0s", "1.5s", "20ms", "1h2m3s": OpenAI's reset durations.
_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m(?!s))?(?:(\d+(?:\.\d+)?)s)?$")
_MILLIS = re.compile(r"^(\d+(?:\.\d+)?)ms$")
# A bare number this large is a Unix time, not a delay (some providers send reset as one).
_EPOCH_THRESHOLD = 1e9


def parse_duration(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a reset header: ``1s``, ``6m0s``, ``20ms``, a bare number of seconds or
    a Unix time; None if absent or unreadable (a bad header must not break an answer)."""
    if value is None:
        return None
    text = value.strip().lower()
    if not text:
        return None
    millis = _MILLIS.match(text)
    if millis:
        return float(millis.group(1)) / 1000
    try:
        number = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(number) or number < 0:
            return None
        if number > _EPOCH_THRESHOLD:
            return max(0.0, number - (time.time() if now is None else now))
        return number
    match = _DURATION.match(text)
    if not match or not any(match.groups()):
        return None
    hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
    return hours * 3600 + minutes * 60 + seconds


def format_duration(seconds: float) -> str:
    """OpenAI's reset format: ``20ms`` under a second, else ``1.5s`` or ``6m0s``."""
    seconds = max(0.0, seconds)
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    minutes, rest = divmod(seconds, 60)
    rest = round(rest, 3)
    text = f"{rest:g}s"
    return f"{int(minutes)}m{text}" if minutes else text


@dataclass(frozen=True)
class RateLimitInfo:
    """What a provider said about its limits (any field may be unknown)."""

    limit_requests: int | None = None
    remaining_requests: int | None = None
    reset_requests_s: float | None = None
    limit_tokens: int | None = None
    remaining_tokens: int | None = None
    reset_tokens_s: float | None = None

    def details(self) -> dict[str, Any]:
        """The known values, for an error's ``details.ratelimit``."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    def headers(self) -> dict[str, str]:
        """The known values as OpenAI's response headers."""
        out: dict[str, str] = {}
        for unit in ("requests", "tokens"):
            limit = getattr(self, f"limit_{unit}")
            remaining = getattr(self, f"remaining_{unit}")
            reset = getattr(self, f"reset_{unit}_s")
            if limit is not None:
                out[f"x-ratelimit-limit-{unit}"] = str(limit)
            if remaining is not None:
                out[f"x-ratelimit-remaining-{unit}"] = str(remaining)
            if reset is not None:
                out[f"x-ratelimit-reset-{unit}"] = format_duration(reset)
        return out

    def wait_s(self) -> float | None:
        """How long until the exhausted limit resets (None when nothing says)."""
        waits = [
            reset
            for remaining, reset in (
                (self.remaining_requests, self.reset_requests_s),
                (self.remaining_tokens, self.reset_tokens_s),
            )
            if reset is not None and (remaining is None or remaining <= 0)
        ]
        return max(waits) if waits else None

    @property
    def empty(self) -> bool:
        return not self.details()


def _int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        number = float(value.strip())
    except ValueError:
        return None
    return int(number) if math.isfinite(number) else None


def limits_from_headers(headers: Mapping[str, str], now: float | None = None) -> RateLimitInfo:
    """Read ``x-ratelimit-*`` response headers (case-insensitive mapping, e.g. requests')."""
    return RateLimitInfo(
        limit_requests=_int(headers.get("x-ratelimit-limit-requests")),
        remaining_requests=_int(headers.get("x-ratelimit-remaining-requests")),
        reset_requests_s=parse_duration(headers.get("x-ratelimit-reset-requests"), now),
        limit_tokens=_int(headers.get("x-ratelimit-limit-tokens")),
        remaining_tokens=_int(headers.get("x-ratelimit-remaining-tokens")),
        reset_tokens_s=parse_duration(headers.get("x-ratelimit-reset-tokens"), now),
    )


@dataclass(frozen=True)
class Admission:
    """A bucket's answer to one request: admitted, or refused with the wait."""

    admitted: bool
    retry_after_s: float
    info: RateLimitInfo
    # more tokens than the bucket ever holds: no wait can admit this request
    too_large: bool = False


@dataclass
class _Level:
    requests: float
    tokens: float
    at: float


class TokenBucket:
    """``rpm`` requests and ``tpm`` tokens per ``window_s`` seconds (either may be None:
    unlimited). Each bucket holds at most one window's worth (requests: ``burst_s``
    seconds' worth, when given) and refills continuously;
    a request takes one request and its token cost, or is refused whole with the time
    until it would fit. ``settle`` gives back (or takes) the difference between the
    tokens charged at admission and the tokens really used.

    The level lives in memory (this process) or, with ``state_file``, in a small JSON
    file under ``fcntl.flock``: then every process on the host that names the same
    file shares one bucket (a replica's gunicorn workers, like one provider
    deployment). Thread-safe either way."""

    def __init__(
        self,
        rpm: int | None,
        tpm: int | None,
        window_s: float = 60.0,
        clock: Clock = time.time,
        state_file: Path | None = None,
        burst_s: float | None = None,
    ) -> None:
        if (rpm is not None and rpm < 1) or (tpm is not None and tpm < 1):
            raise ValueError("rpm and tpm must be >= 1")
        if window_s <= 0:
            raise ValueError("window_s must be > 0")
        if burst_s is not None and not 0 < burst_s <= window_s:
            raise ValueError("burst_s must be in (0, window_s]")
        self.rpm, self.tpm, self.window_s = rpm, tpm, window_s
        # The requests the bucket holds: a whole window's by default; with burst_s, that
        # many seconds' worth (at least one), as providers that enforce a per-minute
        # limit per second do (300 rpm as 5 per second).
        self.request_capacity = float(rpm or 0)
        if rpm is not None and burst_s is not None:
            self.request_capacity = max(1.0, rpm * burst_s / window_s)
        self.clock = clock
        self.state_file = state_file
        self._lock = threading.Lock()
        self._level: _Level | None = None

    # -- the arithmetic, on a level passed in ---------------------------------
    def _refill(self, level: _Level, now: float) -> None:
        elapsed = max(0.0, now - level.at)
        per_s = elapsed / self.window_s
        if self.rpm is not None:
            level.requests = min(self.request_capacity, level.requests + per_s * self.rpm)
        if self.tpm is not None:
            level.tokens = min(float(self.tpm), level.tokens + per_s * self.tpm)
        level.at = max(level.at, now)

    def _info(self, level: _Level) -> RateLimitInfo:
        info: dict[str, Any] = {}
        if self.rpm is not None:
            info.update(
                limit_requests=self.rpm,
                remaining_requests=max(0, math.floor(level.requests)),
                reset_requests_s=(self.request_capacity - level.requests)
                * self.window_s
                / self.rpm,
            )
        if self.tpm is not None:
            info.update(
                limit_tokens=self.tpm,
                remaining_tokens=max(0, math.floor(level.tokens)),
                reset_tokens_s=(self.tpm - level.tokens) * self.window_s / self.tpm,
            )
        return RateLimitInfo(**info)

    def _admit(self, level: _Level, cost: int, now: float) -> Admission:
        self._refill(level, now)
        if self.tpm is not None and cost > self.tpm:
            return Admission(False, 0.0, self._info(level), too_large=True)
        waits = [0.0]
        if self.rpm is not None and level.requests < 1:
            waits.append((1 - level.requests) * self.window_s / self.rpm)
        if self.tpm is not None and level.tokens < cost:
            waits.append((cost - level.tokens) * self.window_s / self.tpm)
        wait = max(waits)
        if wait > 0:
            return Admission(False, wait, self._info(level))
        if self.rpm is not None:
            level.requests -= 1
        if self.tpm is not None:
            level.tokens -= cost
        return Admission(True, 0.0, self._info(level))

    def _settle(self, level: _Level, delta: int, now: float) -> None:
        self._refill(level, now)
        if self.tpm is not None:
            # a refund never overfills; a charge may take the level below zero (debt)
            level.tokens = min(float(self.tpm), level.tokens + delta)

    # -- state ----------------------------------------------------------------
    def _full(self, now: float) -> _Level:
        return _Level(self.request_capacity, float(self.tpm or 0), now)

    def _with_level(self, step: Callable[[_Level, float], Any]) -> Any:
        with self._lock:
            now = self.clock()
            if self.state_file is None:
                if self._level is None:
                    self._level = self._full(now)
                return step(self._level, now)
            fd = os.open(self.state_file, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                raw = os.pread(fd, 4096, 0)
                try:
                    saved = json.loads(raw)
                    level = _Level(float(saved["r"]), float(saved["t"]), float(saved["at"]))
                except (ValueError, KeyError, TypeError):
                    level = self._full(now)
                result = step(level, now)
                data = json.dumps({"r": level.requests, "t": level.tokens, "at": level.at})
                os.ftruncate(fd, 0)
                os.pwrite(fd, data.encode(), 0)
                return result
            finally:
                os.close(fd)  # releases the flock

    def acquire(self, cost: int = 0) -> Admission:
        """Take one request and ``cost`` tokens, or refuse with the wait."""
        result: Admission = self._with_level(lambda level, now: self._admit(level, cost, now))
        return result

    def settle(self, charged: int, used: int) -> None:
        """After the call: refund ``charged - used`` tokens (or charge the excess)."""
        if self.tpm is None or charged == used:
            return
        self._with_level(lambda level, now: self._settle(level, charged - used, now))
