"""Fixtures shared by every test folder: an executor app on a simulated catalog."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient
from support import write_catalog

from executor_service import create_app
from executor_service.config import Settings

SIMULATED_MODELS = {
    "sim": {"provider": "simulated", "latency_s": 0.0},
    "sim-slow": {"provider": "simulated", "latency_s": 0.5},
    "sim-5xx": {"provider": "simulated", "error_rate": 1.0, "error_kind": "5xx", "status": 500},
    "sim-429": {
        "provider": "simulated",
        "error_rate": 1.0,
        "error_kind": "429",
        "retry_after_s": 7,
    },
    "sim-timeout": {"provider": "simulated", "error_rate": 1.0, "error_kind": "timeout"},
    "sim-bug": {"provider": "simulated", "error_rate": 1.0, "error_kind": "exception"},
}


@pytest.fixture
def quiet_root_logger() -> Iterator[None]:
    """create_app() configures the root logger (handler, level); put it back afterwards
    so the tests that follow see the logging they would see without them."""
    root_logger = logging.getLogger()
    level, handlers = root_logger.level, list(root_logger.handlers)
    yield
    root_logger.setLevel(level)
    root_logger.handlers[:] = handlers


@pytest.fixture
def catalog_path(tmp_path: Path) -> Path:
    return write_catalog(tmp_path / "catalog.toml", SIMULATED_MODELS)


@pytest.fixture
def settings(catalog_path: Path) -> Settings:
    return Settings.from_env(
        environ={"ES_CATALOG": str(catalog_path), "ES_REGION": "unit", "ES_REPLICA": "r1"}
    )


@pytest.fixture
def app(settings: Settings) -> Iterator[Flask]:
    yield create_app({"TESTING": True}, settings=settings)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def pytest_unconfigure(config: pytest.Config) -> None:
    """llama_cpp._utils opens /dev/null twice at import and never closes it."""
    import sys

    utils = sys.modules.get("llama_cpp._utils")
    for name in ("outnull_file", "errnull_file"):
        handle = getattr(utils, name, None)
        if handle is not None and not handle.closed:
            handle.close()
