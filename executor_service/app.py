"""What every role's Flask app shares (``base_app``): config, JSON errors, auth, logs,
Sentry, ``/health``, ``/metrics`` and the OpenAPI document. Each role builds its app on
it: ``executor/app.py`` (create_app) and ``dispatcher/api.py`` (create_dispatcher_app).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from flask import Flask, Response, g, jsonify
from flask_smorest import Api

from . import __version__, apidocs, auth, errors, jsonbody, observability
from .config import CommonSettings


class _Api(Api):
    # flask-smorest documents its own error shape ({code, status, message, errors}) for
    # every route's default and 422 responses; ours is the one on the wire.
    ERROR_SCHEMA = errors.ErrorResponseSchema


def base_app(
    name: str, settings: CommonSettings, test_config: Mapping[str, Any] | None, title: str
) -> tuple[Flask, Api]:
    """The parts every role shares: config, JSON errors, auth, logs, Sentry, /health, /metrics
    and the OpenAPI document (``/openapi.json``, docs page at ``/docs``)."""
    app = Flask(name)
    app.config.update(
        SETTINGS=settings,
        MAX_CONTENT_LENGTH=settings.max_body_bytes,
        API_TITLE=title,
        API_VERSION=__version__,
        OPENAPI_VERSION="3.0.3",
        OPENAPI_URL_PREFIX="/",
        OPENAPI_JSON_PATH="openapi.json",
        OPENAPI_SWAGGER_UI_PATH="docs",
        OPENAPI_SWAGGER_UI_URL=apidocs.ASSETS_PREFIX,  # served from the package, offline
        API_SPEC_OPTIONS={
            "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
            "security": [{"bearer": []}],
        },
    )
    if test_config:
        app.config.update(test_config)
    api = _Api(app)
    errors.register_error_handlers(app)  # after Api, which installs its own

    @app.after_request
    def _security_headers(response: Response) -> Response:
        # Answers hold prompts and outputs: no MIME sniffing, no cache on the way keeps them.
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    @app.before_request
    def _start_clock() -> None:
        g.started = time.monotonic()

    jsonbody.init_app(app)  # after the clock: its chunked-body check may answer 413

    auth.init_app(app, auth.KeyRing.from_settings(settings))
    apidocs.init_app(app)
    observability.init_app(app, settings)

    @app.get("/health")
    def health() -> Response:
        """Liveness: the process answers. No auth, no dependencies."""
        return jsonify({"status": "ok"})

    @app.get("/metrics")
    def metrics() -> Response:
        return observability.metrics_response()

    return app, api
