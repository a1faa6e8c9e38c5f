"""The executor's settings (``ES_*``): its model catalog, admission and call deadline, on
top of what every HTTP role reads (``config.CommonSettings``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..config import (
    CommonSettings,
    ConfigError,
    _non_negative_int,
    _optional_path,
    _positive_float,
    _positive_int,
)
from ..gunicorn_common import GUNICORN_TIMEOUT_DEFAULT, env_int


@dataclass(frozen=True)
class ExecutorSettings(CommonSettings):
    """The executor's settings."""

    @property
    def log_region(self) -> str | None:
        """ES_REGION: an executor serves one region, and says so in every line."""
        return self.region

    # Model catalog (TOML); None means the catalog shipped in the package.
    catalog_path: Path | None = field(
        default=None, metadata={"env": "ES_CATALOG", "parse": _optional_path}
    )
    # Model calls in flight per process; 0 means "the gunicorn thread count" (250 with
    # an explicit GUNICORN_WORKER_CLASS=gevent), see executor/gunicorn_config.py.
    max_in_flight: int = field(
        default=0, metadata={"env": "ES_MAX_IN_FLIGHT", "parse": _non_negative_int}
    )
    # Set by executor/gunicorn_config.py for its workers: one lock file per admission
    # slot of the replica (workers x ES_MAX_IN_FLIGHT), so the limit is the replica's,
    # not each process's (see executor/admission.py). Unset outside gunicorn.
    admission_dir: Path | None = field(
        default=None, metadata={"env": "ES_ADMISSION_DIR", "parse": _optional_path}
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

    def check(self, environ: Mapping[str, str]) -> None:
        super().check(environ)
        timeout = env_int("GUNICORN_TIMEOUT", GUNICORN_TIMEOUT_DEFAULT, environ, fail=ConfigError)
        if self.timeout_cap_s >= timeout:
            raise ConfigError(
                f"ES_TIMEOUT_CAP_S={self.timeout_cap_s:g} must be below GUNICORN_TIMEOUT"
                f"={timeout} (gunicorn's worker timeout), so a slow call gets a 504 before"
                " gunicorn kills the worker"
            )
