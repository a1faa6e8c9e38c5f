"""The executor's Flask app factory: ``create_app`` (also importable as
``executor_service.create_app``, which ``wsgi:app`` and ``serve`` use)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flask import Flask

from ..app import base_app
from .config import ExecutorSettings


def create_app(
    test_config: Mapping[str, Any] | None = None, settings: ExecutorSettings | None = None
) -> Flask:
    """The executor app: settings from the environment (``ES_*``), then test overrides."""
    from . import api as executor_api

    settings = settings or ExecutorSettings.from_env()
    app, api = base_app("executor_service", settings, test_config, "executor-service executor")
    executor_api.init_app(app, settings, api)
    return app
