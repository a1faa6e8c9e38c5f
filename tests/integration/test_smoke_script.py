"""scripts/smoke.sh against a real gunicorn: passes on a healthy executor, else fails loudly."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from support import REPO, Gunicorn, write_catalog

pytestmark = pytest.mark.slow


def smoke(url: str, key: str | None, model: str) -> subprocess.CompletedProcess[str]:
    args = ["bash", str(REPO / "scripts" / "smoke.sh"), url] + ([key] if key else [])
    env = {**os.environ, "SMOKE_MODEL": model, "SMOKE_TIMEOUT": "20"}
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)


def test_smoke_script_passes_and_fails_when_it_should(tmp_path: Path) -> None:
    catalog = write_catalog(tmp_path / "c.toml", {"sim": {"provider": "simulated"}})
    env = {"ES_CATALOG": str(catalog), "WEB_CONCURRENCY": "1", "ES_API_KEYS": "k1"}
    with Gunicorn(tmp_path, env) as server:
        ok = smoke(server.url, "k1", "sim")
        assert ok.returncode == 0, ok.stderr
        assert "smoke check passed" in ok.stdout
        no_key = smoke(server.url, None, "sim")
        assert no_key.returncode != 0
        assert "answered 401" in no_key.stderr
        wrong_model = smoke(server.url, "k1", "missing-model")
        assert wrong_model.returncode != 0
        assert "answered 404" in wrong_model.stderr
    down = smoke(server.url, "k1", "sim")
    assert down.returncode != 0
    assert "GET /health answered 000" in down.stderr
