"""Logging, the /metrics response and Sentry, shared by the executor and the dispatcher
(each role's metrics live with it: ``executor/metrics.py``, ``dispatcher/metrics.py``).

Logs are JSON lines (python-json-logger) carrying request_id, model, region,
status and timings. Metrics are prometheus-client objects; under gunicorn the
config sets ``PROMETHEUS_MULTIPROC_DIR`` before any worker imports this
module, so every worker writes its own files and ``/metrics`` adds them up.
Sentry starts only when ``SENTRY_DSN`` is set, and never sees prompts or
outputs unless ``ES_SENTRY_SEND_PROMPTS`` allows it.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from flask import Flask, Response, g, has_request_context
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    generate_latest,
    multiprocess,
)
from pythonjsonlogger.json import JsonFormatter

from .config import CommonSettings as Settings

logger = logging.getLogger(__name__)

# Fields Sentry must never carry unless prompts are explicitly allowed.
SENSITIVE_KEYS = frozenset({"prompt", "messages", "output", "content", "questions", "answer"})


class RequestContextFilter(logging.Filter):
    """Adds request_id, model, region and tenant from the Flask request, when there is one."""

    def __init__(self, region: str | None) -> None:
        super().__init__()
        self.region = region

    def filter(self, record: logging.LogRecord) -> bool:
        if self.region is not None and not hasattr(record, "region"):
            record.region = self.region
        if has_request_context():
            for name in ("request_id", "model", "tenant"):
                if not hasattr(record, name) and name in g:
                    setattr(record, name, g.get(name))
        return True


def configure_logging(settings: Settings) -> None:
    """JSON (or plain text) lines on stdout, one handler on the root logger."""
    handler = logging.StreamHandler(sys.stdout)
    if settings.log_format == "json":
        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s",
                rename_fields={"levelname": "level", "asctime": "time"},
            )
        )
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    handler.addFilter(RequestContextFilter(settings.log_region))
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_executor_service", False):
            root.removeHandler(old)
    handler._executor_service = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())


def metrics_response() -> Response:
    """The Prometheus text of this process, or of every gunicorn worker in multiprocess mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)


def _scrub(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: ("[scrubbed]" if k in SENSITIVE_KEYS else _scrub(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    return value


def scrub_event(event: dict[str, Any], _hint: dict[str, Any]) -> dict[str, Any]:
    """Sentry before_send: drop request bodies and any prompt/output field."""
    request = event.get("request")
    if isinstance(request, dict):
        request.pop("data", None)
    for key in ("extra", "contexts"):
        if key in event:
            event[key] = _scrub(event[key])
    return event


def init_sentry(settings: Settings, transport: Any = None) -> bool:
    """Start Sentry when a DSN is set; tag every event with the region and replica."""
    if not settings.sentry_dsn:
        return False
    import sentry_sdk
    from sentry_sdk.integrations.flask import FlaskIntegration

    allow = settings.sentry_send_prompts
    options: dict[str, Any] = {
        "dsn": settings.sentry_dsn,
        "environment": settings.sentry_environment,
        "integrations": [FlaskIntegration()],
        # Request bodies and frame locals hold prompts; keep them out by default.
        "max_request_body_size": "medium" if allow else "never",
        "include_local_variables": allow,
        "before_send": None if allow else scrub_event,
        "server_name": settings.replica,
    }
    if transport is not None:
        options["transport"] = transport
    sentry_sdk.init(**options)
    if settings.log_region is not None:
        sentry_sdk.set_tag("region", settings.log_region)
    sentry_sdk.set_tag("replica", settings.replica)
    return True


def init_app(app: Flask, settings: Settings) -> None:
    """Logging and Sentry for this app; the routes add their own metrics."""
    if not app.testing:
        configure_logging(settings)
    init_sentry(settings, transport=app.config.get("SENTRY_TRANSPORT"))
