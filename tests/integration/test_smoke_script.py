"""scripts/smoke.sh as an operator runs it: usage without arguments, a plain message when
the host cannot be reached, and against a real gunicorn it passes on a healthy executor
and fails loudly (with what to do) when a check does not hold."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from support import REPO, Gunicorn, free_port, write_catalog

SMOKE = REPO / "scripts" / "smoke.sh"


def smoke(*args: str, model: str = "sim") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "ES_API_KEY"}
    env.update(SMOKE_MODEL=model, SMOKE_TIMEOUT="20")
    return subprocess.run(
        ["bash", str(SMOKE), *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_no_argument_prints_the_usage_and_exits_2() -> None:
    result = subprocess.run(["bash", str(SMOKE)], capture_output=True, text=True, timeout=10)
    assert result.returncode == 2
    assert result.stderr.startswith("usage: scripts/smoke.sh URL [KEY]\n")
    assert "line " not in result.stderr  # no bash error text
    assert "Exit code" in result.stderr
    help_ = subprocess.run(["bash", str(SMOKE), "--help"], capture_output=True, text=True)
    assert help_.returncode == 0
    assert help_.stdout.startswith("usage: scripts/smoke.sh URL [KEY]")


def test_unreachable_host_says_so() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result = smoke(url, "k1")
    assert result.returncode == 1
    assert result.stderr.startswith(f"FAIL: cannot reach {url} (GET /health): curl: (7)")
    assert "Is the URL right" in result.stderr
    assert "000" not in result.stderr


@pytest.mark.slow
def test_smoke_script_passes_and_fails_when_it_should(tmp_path: Path) -> None:
    catalog = write_catalog(tmp_path / "c.toml", {"sim": {"provider": "simulated"}})
    env = {"ES_CATALOG": str(catalog), "WEB_CONCURRENCY": "1", "ES_API_KEYS": "k1"}
    with Gunicorn(tmp_path, env) as server:
        ok = smoke(server.url, "k1")
        assert ok.returncode == 0, ok.stderr
        executed = [x for x in ok.stdout.splitlines() if x.startswith("ok   POST /execute (sim)")]
        assert ok.stdout.splitlines() == [
            "ok   GET /health -> 200",
            "ok   GET /ready -> 200",
            "ok   GET /models (wrong key) -> 401",
            *executed,
            "ok   POST /execute (bad request) -> 422 validation_error",
            f"smoke check passed: {server.url}",
        ]
        no_key = smoke(server.url)
        assert no_key.returncode == 1
        assert "skip wrong-key check" in no_key.stdout
        assert "POST /execute (sim) answered 401, expected 200 (unauthorized: give the" in (
            no_key.stderr
        )
        wrong_model = smoke(server.url, "k1", model="missing-model")
        assert wrong_model.returncode == 1
        assert "answered 404, expected 200 (not found: is SMOKE_MODEL in" in wrong_model.stderr
    # Open (no keys): a given KEY must be refused when wrong, and here it is not.
    open_env = {"ES_CATALOG": str(catalog), "WEB_CONCURRENCY": "1"}
    with Gunicorn(tmp_path, open_env) as server:
        accepted = smoke(server.url, "k1")
        assert accepted.returncode == 1
        assert "with a wrong key answered 200, expected 401" in accepted.stderr
