"""Settings from the environment, read and validated once at start, per role.

Every setting has one environment variable with the ``ES_`` prefix (plus the
conventional ``PORT``, ``WEB_CONCURRENCY`` and ``SENTRY_DSN``, which platforms
set for us). A bad value stops the process with a message that names the
variable, the value and what was expected, instead of failing on first use;
cross-field checks (``check``) name every variable involved.

    config.py               the reader (EnvSettings) and what every HTTP role shares
                            (CommonSettings: identity, keys, logs, Sentry, body limit)
    executor/config.py      ExecutorSettings: catalog, admission, call deadline
    dispatcher/config.py    DispatcherSettings: store, regions, leases, backoff,
                            circuits, job limits; ClientSettings: where the CLI finds the API
    Settings (here)         every role's fields at once: the README check, tests

Each default is defined once, in its field; runtime configs (WorkerConfig,
BackoffPolicy, JobLimits) are derived from a settings object, never restated.

Why not environs: it reads ``os.environ`` only, and the apps and tests here read
an explicit mapping (``from_env(environ=...)``); its parsing is marshmallow fields,
which these few typed parsers match while keeping messages a user can act on.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar

from .exceptions import ExecutorServiceError

PREFIX = "ES_"

TSettings = TypeVar("TSettings", bound="EnvSettings")


class ConfigError(ExecutorServiceError, ValueError):
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
class EnvSettings:
    """Validated settings. Field metadata names the variable and its parser."""

    @classmethod
    def from_env(
        cls: type[TSettings], environ: Mapping[str, str] | None = None, **overrides: Any
    ) -> TSettings:
        """Read every field from ``environ`` (default ``os.environ``), apply overrides,
        then run the cross-field checks."""
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
        settings = replace(settings, **overrides) if overrides else settings
        settings.check(env)
        return settings

    def check(self, environ: Mapping[str, str]) -> None:
        """Cross-field checks; raise ConfigError naming the variables. ``environ`` is what
        the settings were read from (for limits set by another program, e.g. gunicorn)."""

    @classmethod
    def env_names(cls) -> list[str]:
        """Every environment variable this class reads (for the README check)."""
        return [f.metadata["env"] for f in fields(cls)]

    @classmethod
    def default(cls, name: str) -> Any:
        """The default of field ``name``: what runtime configs derive theirs from."""
        f = next(f for f in fields(cls) if f.name == name)
        return f.default_factory() if f.default_factory is not MISSING else f.default


@dataclass(frozen=True)
class CommonSettings(EnvSettings):
    """What every HTTP role (executor, dispatcher API) reads."""

    # Identity of this replica, reported in every answer and log line.
    region: str = field(default="local", metadata={"env": "ES_REGION"})
    replica: str = field(default_factory=socket.gethostname, metadata={"env": "ES_REPLICA"})
    # Authentication: "key" or "tenant:key" entries, comma separated, and/or a
    # file with one entry per line.
    api_keys: str = field(default="", metadata={"env": "ES_API_KEYS"})
    api_keys_file: Path | None = field(
        default=None, metadata={"env": "ES_API_KEYS_FILE", "parse": _optional_path}
    )
    # Serving without any key on a non-loopback address must be asked for.
    allow_open: bool = field(default=False, metadata={"env": "ES_ALLOW_OPEN", "parse": _parse_bool})
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


def __getattr__(name: str) -> Any:
    """``Settings``: every role's settings in one class (imported lazily: the role
    modules import this one)."""
    if name == "Settings":
        from .all_settings import Settings

        return Settings
    raise AttributeError(name)
