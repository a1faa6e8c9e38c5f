"""Settings from the environment, read and validated once at start.

Every setting has one environment variable with the ``ES_`` prefix (plus the
conventional ``PORT``, ``WEB_CONCURRENCY`` and ``SENTRY_DSN``, which platforms
set for us). A bad value stops the process with a message that names the
variable, the value and what was expected, instead of failing on first use.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

PREFIX = "ES_"


class ConfigError(ValueError):
    """A setting from the environment has a value we cannot use."""


def _parse_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError("expected true/false")


def _positive_float(raw: str) -> float:
    value = float(raw)
    if value <= 0:
        raise ValueError("expected a number > 0")
    return value


def _non_negative_float(raw: str) -> float:
    value = float(raw)
    if not 0 <= value < float("inf"):  # also rejects nan
        raise ValueError("expected a finite number >= 0")
    return value


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value <= 0:
        raise ValueError("expected an integer > 0")
    return value


def _non_negative_int(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError("expected an integer >= 0")
    return value


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}")
        return value

    return parse


def _optional_path(raw: str) -> Path | None:
    return Path(raw).expanduser() if raw.strip() else None


@dataclass(frozen=True)
class Settings:
    """Validated settings. Field metadata names the variable and its parser."""

    # Identity of this replica, reported in every answer and log line.
    region: str = field(default="local", metadata={"env": "ES_REGION"})
    replica: str = field(default_factory=socket.gethostname, metadata={"env": "ES_REPLICA"})
    # Model catalog (TOML); None means the catalog shipped in the package.
    catalog_path: Path | None = field(
        default=None, metadata={"env": "ES_CATALOG", "parse": _optional_path}
    )
    # Authentication: "key" or "tenant:key" entries, comma separated, and/or a
    # file with one entry per line.
    api_keys: str = field(default="", metadata={"env": "ES_API_KEYS"})
    api_keys_file: Path | None = field(
        default=None, metadata={"env": "ES_API_KEYS_FILE", "parse": _optional_path}
    )
    # Serving without any key on a non-loopback address must be asked for.
    allow_open: bool = field(default=False, metadata={"env": "ES_ALLOW_OPEN", "parse": _parse_bool})
    # Model calls in flight per process; 0 means "the gunicorn thread count"
    # (gthread) or 250 (gevent), see gunicorn_config.py.
    max_in_flight: int = field(
        default=0, metadata={"env": "ES_MAX_IN_FLIGHT", "parse": _non_negative_int}
    )
    # Seconds a client should wait before retrying after a 503.
    retry_after_s: int = field(
        default=1, metadata={"env": "ES_RETRY_AFTER_S", "parse": _positive_int}
    )
    # Server-side cap on one model call; below gunicorn's 60 s worker timeout
    # so the app answers 504 before gunicorn kills the worker.
    timeout_cap_s: float = field(
        default=50.0, metadata={"env": "ES_TIMEOUT_CAP_S", "parse": _positive_float}
    )
    # Request bodies above this many bytes get 413 (32,000-char prompts fit
    # with room for a long messages list).
    max_body_bytes: int = field(
        default=1024 * 1024, metadata={"env": "ES_MAX_BODY_BYTES", "parse": _positive_int}
    )
    log_level: str = field(
        default="info",
        metadata={"env": "ES_LOG_LEVEL", "parse": _choice("debug", "info", "warning", "error")},
    )
    log_format: str = field(
        default="json", metadata={"env": "ES_LOG_FORMAT", "parse": _choice("json", "text")}
    )
    sentry_dsn: str = field(default="", metadata={"env": "SENTRY_DSN"})
    sentry_environment: str = field(default="production", metadata={"env": "ES_SENTRY_ENVIRONMENT"})
    # Prompts and outputs are scrubbed from Sentry events unless this is set.
    sentry_send_prompts: bool = field(
        default=False, metadata={"env": "ES_SENTRY_SEND_PROMPTS", "parse": _parse_bool}
    )
    # Dispatcher: the store and the regions it fans out to.
    database_url: str = field(
        default="sqlite:///executor-service.db", metadata={"env": "ES_DATABASE_URL"}
    )
    regions_file: Path | None = field(
        default=None, metadata={"env": "ES_REGIONS_FILE", "parse": _optional_path}
    )
    # Job size limits (questions x models x regions executions at most).
    max_job_executions: int = field(
        default=100_000, metadata={"env": "ES_MAX_JOB_EXECUTIONS", "parse": _positive_int}
    )
    # Fairness: at most this many executions per tenant per claim cycle.
    tenant_batch: int = field(
        default=20, metadata={"env": "ES_TENANT_BATCH", "parse": _positive_int}
    )
    lease_s: float = field(default=30.0, metadata={"env": "ES_LEASE_S", "parse": _positive_float})
    # Dispatcher runtime. Job size: questions per job (each question runs once per
    # model and region, so this bounds the request body and the results page).
    max_job_questions: int = field(
        default=10_000, metadata={"env": "ES_MAX_JOB_QUESTIONS", "parse": _positive_int}
    )
    # Retry backoff: base * 2**(attempt-1), capped, with jitter (full spreads a
    # burst of failures the most; equal keeps at least half the delay).
    backoff_base_s: float = field(
        default=1.0, metadata={"env": "ES_BACKOFF_BASE_S", "parse": _positive_float}
    )
    backoff_max_s: float = field(
        default=60.0, metadata={"env": "ES_BACKOFF_MAX_S", "parse": _positive_float}
    )
    backoff_jitter: str = field(
        default="full",
        metadata={"env": "ES_BACKOFF_JITTER", "parse": _choice("full", "equal", "none")},
    )
    # Circuit breaker per region: open after this many consecutive failures, stop
    # claiming for the cool-down, then let one probe call through (half-open).
    circuit_threshold: int = field(
        default=5, metadata={"env": "ES_CIRCUIT_THRESHOLD", "parse": _positive_int}
    )
    circuit_cooldown_s: float = field(
        default=30.0, metadata={"env": "ES_CIRCUIT_COOLDOWN_S", "parse": _positive_float}
    )
    # A failover-any retry that failed in a region is taken back by that region only
    # once it has been due this long: other (healthy) regions get it first.
    retry_handoff_s: float = field(
        default=0.5, metadata={"env": "ES_RETRY_HANDOFF_S", "parse": _non_negative_float}
    )
    # How often an idle region asks the store for work submitted by another
    # process; local completions and due retries wake it at once. 50 ms keeps a
    # retry started by another process within backoff + 100 ms (D2) even with a
    # slow claim; an idle claim is one indexed query, so 20/s per region is cheap.
    claim_poll_s: float = field(
        default=0.05, metadata={"env": "ES_CLAIM_POLL_S", "parse": _positive_float}
    )
    # On SIGTERM, in-flight calls get this long to finish before their leases
    # are released for another worker.
    shutdown_grace_s: float = field(
        default=30.0, metadata={"env": "ES_SHUTDOWN_GRACE_S", "parse": _positive_float}
    )
    # Where the CLI (submit, status, results) finds the dispatcher API, and its key.
    dispatcher_url: str = field(
        default="http://127.0.0.1:8100", metadata={"env": "ES_DISPATCHER_URL"}
    )
    dispatcher_key: str = field(default="", metadata={"env": "ES_DISPATCHER_KEY"})

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read every field from ``environ`` (default ``os.environ``), then apply overrides."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            name = f.metadata["env"]
            if name not in env:
                continue
            raw = env[name]
            parse = f.metadata.get("parse", str)
            try:
                values[f.name] = parse(raw)
            except ValueError as exc:
                raise ConfigError(f"{name}={raw!r} is not valid: {exc}") from None
        settings = cls(**values)
        return replace(settings, **overrides) if overrides else settings

    def env_names(self) -> list[str]:
        """Every environment variable this class reads (for the README check)."""
        return [f.metadata["env"] for f in fields(self)]
