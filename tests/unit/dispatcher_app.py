"""The dispatcher's Flask app on the in-memory store, through Flask's test client: the
set-up the API, workbench and Batch API unit tests share (each adds its own helpers)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from flask.testing import FlaskClient

from executor_service.dispatcher.api import create_dispatcher_app
from executor_service.dispatcher.config import DispatcherSettings
from executor_service.dispatcher.regions import Regions
from executor_service.dispatcher.store.memory import MemoryStore

ALICE = {"Authorization": "Bearer key-a"}
BOB = {"Authorization": "Bearer key-b"}


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class DispatcherApp:
    """Tenants alice (key-a) and bob (key-b), the regions of ``regions_toml``, settings
    from ``environ`` on top of those, a fake clock starting at ``now``."""

    def __init__(
        self,
        tmp: Path,
        regions_toml: str,
        environ: Mapping[str, str] | None = None,
        now: float = 1_000_000.0,
    ) -> None:
        regions = tmp / "regions.toml"
        regions.write_text(regions_toml)
        self.settings = DispatcherSettings.from_env(
            environ={
                "ES_REGIONS_FILE": str(regions),
                "ES_DATABASE_URL": "memory://",
                "ES_API_KEYS": "alice:key-a,bob:key-b",
                **(environ or {}),
            }
        )
        self.store = MemoryStore()
        self.regions = Regions.load(regions)
        self.clock = Clock(now)
        app = create_dispatcher_app(
            {"TESTING": True}, settings=self.settings, store=self.store, clock=self.clock
        )
        self.client: FlaskClient = app.test_client()
