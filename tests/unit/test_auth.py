from __future__ import annotations

from pathlib import Path

import pytest
from flask.testing import FlaskClient

from executor_service import create_app
from executor_service.auth import KeyRing, check_open_bind
from executor_service.config import ConfigError, Settings


def test_keyring_maps_keys_to_tenants(tmp_path: Path) -> None:
    keyfile = tmp_path / "keys"
    keyfile.write_text("# comment\nteam-b:kb\n\n")
    ring = KeyRing.from_settings(
        Settings.from_env(
            environ={"ES_API_KEYS": "ka, team-c:kc", "ES_API_KEYS_FILE": str(keyfile)}
        )
    )
    assert ring.tenant_for("ka") == "default"
    assert ring.tenant_for("kb") == "team-b"
    assert ring.tenant_for("kc") == "team-c"
    assert ring.tenant_for("k") is None
    assert ring.tenant_for("kbx") is None


def test_unreadable_key_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="ES_API_KEYS_FILE"):
        KeyRing.from_settings(
            Settings.from_env(environ={"ES_API_KEYS_FILE": str(tmp_path / "missing")})
        )


@pytest.mark.parametrize("bind", ["0.0.0.0:8000", "[::]:8000", "10.1.2.3:80", "example.org:80"])
def test_open_server_refused_on_public_bind(bind: str) -> None:
    with pytest.raises(ConfigError, match="ES_ALLOW_OPEN"):
        check_open_bind([bind], KeyRing(), allow_open=False)


@pytest.mark.parametrize("bind", ["127.0.0.1:8000", "[::1]:8000", "localhost:8000", "unix:/tmp/s"])
def test_open_server_allowed_on_loopback(bind: str) -> None:
    check_open_bind([bind], KeyRing(), allow_open=False)


def test_open_server_allowed_when_told_or_keyed() -> None:
    check_open_bind(["0.0.0.0:8000"], KeyRing(), allow_open=True)
    check_open_bind(["0.0.0.0:8000"], KeyRing.parse(["k"]), allow_open=False)


@pytest.fixture
def keyed_client(catalog_path: Path) -> FlaskClient:
    settings = Settings.from_env(
        environ={"ES_CATALOG": str(catalog_path), "ES_API_KEYS": "secret-key"}
    )
    return create_app({"TESTING": True}, settings=settings).test_client()


def test_missing_or_wrong_key_gives_401(keyed_client: FlaskClient) -> None:
    body = {"model": "sim", "prompt": "hi"}
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic secret-key"}):
        r = keyed_client.post("/execute", json=body, headers=headers)
        assert r.status_code == 401
        assert r.json["error"]["code"] == "unauthorized"
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
    for path in ("/models", "/metrics"):
        assert keyed_client.get(path).status_code == 401
    # The docs page and the document it fetches are public: a browser sends no key.
    for path in ("/docs", "/openapi.json", "/docs/assets/swagger-ui-bundle.js"):
        with keyed_client.get(path) as r:  # a file response: close it
            assert r.status_code == 200, path


def test_right_key_passes_and_probes_are_public(keyed_client: FlaskClient) -> None:
    r = keyed_client.post(
        "/execute",
        json={"model": "sim", "prompt": "hi"},
        headers={"Authorization": "Bearer secret-key"},
    )
    assert r.status_code == 200
    assert keyed_client.get("/health").status_code == 200
    assert keyed_client.get("/ready").status_code == 200


def test_one_key_for_two_tenants_is_refused_at_start(tmp_path: Path) -> None:
    keyfile = tmp_path / "keys"
    keyfile.write_text("team-b:shared\n")
    settings = Settings.from_env(
        environ={"ES_API_KEYS": "team-a:shared", "ES_API_KEYS_FILE": str(keyfile)}
    )
    with pytest.raises(ConfigError, match="same API key is configured twice") as refused:
        KeyRing.from_settings(settings)
    assert "shared" not in str(refused.value)  # the key itself is never printed
    with pytest.raises(ConfigError), create_app(settings=settings).app_context():
        pass
    # the same key listed twice for the same tenant is harmless
    assert KeyRing.parse(["t:k", "t:k"]).tenant_for("k") == "t"
