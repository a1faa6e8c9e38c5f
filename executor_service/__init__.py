"""executor-service: run language-model calls across regions.

Two roles in one package, each with its own app, settings, metrics and commands:

    executor/      the executor: a Flask app (executor/app.py) that runs one model call per
                   ``POST /execute`` under gunicorn (executor/gunicorn_config.py)
    dispatcher/    the dispatcher: a durable store of jobs (store/), the rules that schedule
                   them (rules.py, scheduler.py), the region workers (worker.py) and its
                   HTTP API (api.py)

Shared by both: app.py (base Flask app), config.py (settings reader), errors.py (JSON
errors), exceptions.py (the one exception base), jsonbody.py (strict JSON bodies), auth.py,
observability.py, cli.py.

This module stays light (nothing imported at import time), so a gunicorn config can
import from the package before PROMETHEUS_MULTIPROC_DIR is set.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flask import Flask

    from .executor.config import ExecutorSettings

__version__ = "0.1.0"


def create_app(
    test_config: Mapping[str, Any] | None = None, settings: ExecutorSettings | None = None
) -> Flask:
    """The executor app (``executor.app.create_app``), for ``wsgi:app`` and gunicorn."""
    from .executor.app import create_app as create_executor_app

    return create_executor_app(test_config, settings)
