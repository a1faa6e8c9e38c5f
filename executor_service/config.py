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

Read with marshmallow (a schema per settings class, built from the dataclass fields,
each variable a field's ``data_key``). Not environs, which is marshmallow underneath:
it reads ``os.environ`` only, where the apps and tests here pass an explicit mapping
(``from_env(environ=...)``).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from marshmallow import EXCLUDE, Schema, ValidationError, fields, validate

from .exceptions import ExecutorServiceError

PREFIX = "ES_"

TSettings = TypeVar("TSettings", bound="EnvSettings")


class ConfigError(ExecutorServiceError, ValueError):
    """A setting from the environment has a value we cannot use."""


# -- the fields: marshmallow fields, each with the message a user can act on -------------


class _Flag(fields.Field):
    """true/false, yes/no, on/off, 1/0 (any case); empty is false."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> bool:
        text = str(value).strip().lower()
        if text in {"1", "true", "yes", "on"}:
            return True
        if text in {"0", "false", "no", "off", ""}:
            return False
        raise ValidationError("expected true/false")


class _Choice(fields.String):
    """One of ``allowed``, case-insensitive, returned lower-case."""

    def __init__(self, allowed: tuple[str, ...], **kwargs: Any) -> None:
        error = f"expected one of {', '.join(allowed)}"
        super().__init__(validate=validate.OneOf(allowed, error=error), **kwargs)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        return str(super()._deserialize(value, attr, data, **kwargs)).strip().lower()


class _OptionalPath(fields.Field):
    """A path (``~`` expanded); empty means none."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Path | None:
        text = str(value)
        return Path(text).expanduser() if text.strip() else None


def _number(cls: type[fields.Number], error: str, **bounds: Any) -> Callable[..., fields.Field]:
    def make(**kwargs: Any) -> fields.Field:
        messages: dict[str, Any] = {"invalid": error, "special": error, "too_large": error}
        return cls(
            validate=validate.Range(error=error, **bounds), error_messages=messages, **kwargs
        )

    return make


_parse_bool: Callable[..., fields.Field] = _Flag
_positive_float = _number(fields.Float, "expected a number > 0", min=0, min_inclusive=False)
_non_negative_float = _number(fields.Float, "expected a finite number >= 0", min=0)
_positive_int = _number(fields.Integer, "expected an integer > 0", min=1)
_fraction = _number(fields.Float, "expected a number within 0..1", min=0, max=1)
_non_negative_int = _number(fields.Integer, "expected an integer >= 0", min=0)
_optional_path: Callable[..., fields.Field] = _OptionalPath


def _choice(*allowed: str) -> Callable[..., fields.Field]:
    return functools.partial(_Choice, allowed)


_SCHEMAS: dict[type, Schema] = {}


def _schema(cls: type) -> Schema:
    """The marshmallow schema of a settings class: one field per dataclass field, loaded
    from its variable (``data_key``), with the field's parser (text by default)."""
    if cls not in _SCHEMAS:
        declared = {
            f.name: f.metadata.get("parse", fields.String)(data_key=f.metadata["env"])
            for f in dataclasses.fields(cls)
        }
        schema = Schema.from_dict(declared, name=f"{cls.__name__}Schema")
        _SCHEMAS[cls] = schema(unknown=EXCLUDE)
    return _SCHEMAS[cls]


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
        raw = {name: env[name] for name in cls.env_names() if name in env}
        try:
            values = _schema(cls).load(raw)
        except ValidationError as exc:
            name, problems = next(iter(exc.normalized_messages().items()))
            message = problems[0] if isinstance(problems, list) else problems
            raise ConfigError(f"{name}={raw.get(name)!r} is not valid: {message}") from None
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
        return [f.metadata["env"] for f in dataclasses.fields(cls)]

    @classmethod
    def default(cls, name: str) -> Any:
        """The default of field ``name``: what runtime configs derive theirs from."""
        f = next(f for f in dataclasses.fields(cls) if f.name == name)
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

    @property
    def log_region(self) -> str | None:
        """The region every log line and Sentry event of this process carries (None: a
        line carries the region of its own work, or none)."""
        return self.region


def __getattr__(name: str) -> Any:
    """``Settings``: every role's settings in one class (imported lazily: the role
    modules import this one)."""
    if name == "Settings":
        from .all_settings import Settings

        return Settings
    raise AttributeError(name)
