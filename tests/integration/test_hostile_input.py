"""Hostile JSON and headers: never a 500, never a retryable code for a permanent problem,
a 422 naming the field, and no prompt text in the logs. The executor through Flask's
test client; the dispatcher API on both stores (SQLite and a fresh PostgreSQL database)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from store_fixtures import PostgresDatabases, sqlite_url

from executor_service.config import Settings
from executor_service.dispatcher.api import create_dispatcher_app
from executor_service.dispatcher.store import open_store

SECRET = "zebra-secret-4711"
DEEP = "[" * 1000 + "]" * 1000
HUGE_INT = "9" * 4300
TOO_MANY_DIGITS = "9" * 5000

# (name, raw JSON body of the executor, the field the 422 must name)
EXECUTOR_CASES = [
    ("deep nesting", '{"model": "sim", "prompt": "x", "seed": ' + DEEP + "}", "_json"),
    (
        "deep but parseable",
        '{"model": "sim", "prompt": "x", "seed": ' + "[" * 40 + "]" * 40 + "}",
        "seed." + ".".join(["0"] * 31),
    ),
    ("4,300-digit integer", '{"model": "sim", "prompt": "x", "seed": ' + HUGE_INT + "}", "seed"),
    (
        "5,000-digit integer",
        '{"model": "sim", "prompt": "x", "seed": ' + TOO_MANY_DIGITS + "}",
        "seed",
    ),
    (
        "int beyond 64 bits",
        '{"model": "sim", "prompt": "x", "max_tokens": 9223372036854775808}',
        "max_tokens",
    ),
    (
        "huge float field",
        '{"model": "sim", "prompt": "x", "temperature": ' + HUGE_INT + "}",
        "temperature",
    ),
    ("NaN", '{"model": "sim", "prompt": "x", "temperature": NaN}', "temperature"),
    ("lone surrogate", '{"model": "sim", "prompt": "' + SECRET + '\\ud800"}', "prompt"),
    ("NUL", '{"model": "sim", "prompt": "' + SECRET + '\\u0000"}', "prompt"),
    (
        "NUL in a message",
        '{"model": "sim", "messages": [{"role": "user", "content": "' + SECRET + '\\u0000"}]}',
        "messages.0.content",
    ),
    ("surrogate in a key", '{"model": "sim", "prompt": "x", "\\udc00": 1}', "_json"),
]


def assert_422_naming(response: Any, field: str) -> None:
    assert response.status_code == 422, response.get_data(as_text=True)[:500]
    body = response.get_json()
    assert body["error"]["code"] == "validation_error"
    assert field in body["error"]["details"], body["error"]["details"]
    assert SECRET not in response.get_data(as_text=True)


def assert_no_secret_logged(caplog: pytest.LogCaptureFixture) -> None:
    for record in caplog.records:
        assert SECRET not in record.getMessage()
        assert SECRET not in str(record.__dict__)


@pytest.mark.parametrize(
    ("name", "raw", "field"), EXECUTOR_CASES, ids=[c[0] for c in EXECUTOR_CASES]
)
def test_executor_refuses_hostile_json_with_422(
    app: Flask, name: str, raw: str, field: str, caplog: pytest.LogCaptureFixture
) -> None:
    app.testing = False  # a bug must show as the 500 a client would see, not raise here
    caplog.set_level(logging.DEBUG)
    r = app.test_client().post(
        "/execute", data=raw.encode(), headers={"Content-Type": "application/json"}
    )
    assert_422_naming(r, field)
    assert_no_secret_logged(caplog)


def test_request_id_header_is_held_to_the_body_rule(client: FlaskClient) -> None:
    body = {"model": "sim", "prompt": "x"}
    r = client.post("/execute", json=body, headers={"X-Request-ID": "bad id <script>"})
    assert_422_naming(r, "X-Request-ID")
    r = client.post("/execute", json=body, headers={"X-Request-ID": "x" * 129})
    assert_422_naming(r, "X-Request-ID")
    r = client.post("/execute", json=body, headers={"X-Request-ID": "job-1.exec-2.3"})
    assert r.status_code == 200
    assert r.headers["X-Request-ID"] == "job-1.exec-2.3" == r.get_json()["request_id"]


def test_answers_carry_nosniff_and_no_store(client: FlaskClient) -> None:
    for r in (
        client.post("/execute", json={"model": "sim", "prompt": "x"}),
        client.post("/execute", json={"model": "nope", "prompt": "x"}),
        client.get("/health"),
    ):
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        assert r.headers["Cache-Control"] == "no-store"


# -- the dispatcher, on both stores ------------------------------------------------------
REGIONS_TOML = """
[regions.us]
url = "http://127.0.0.1:9"
concurrency = 2
models = ["m1"]
"""


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresDatabases]:
    databases = PostgresDatabases()
    yield databases
    databases.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def dispatcher(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[FlaskClient, dict[str, str]]]:
    if request.param == "sqlite":
        url, drop = sqlite_url(tmp_path), None
    else:
        databases: PostgresDatabases = request.getfixturevalue("postgres")
        url = databases.create()
        drop = databases
    (tmp_path / "regions.toml").write_text(REGIONS_TOML)
    settings = Settings.from_env(
        environ={
            "ES_REGIONS_FILE": str(tmp_path / "regions.toml"),
            "ES_DATABASE_URL": url,
            "ES_API_KEYS": "alice:key-a",
        }
    )
    store = open_store(url)
    app = create_dispatcher_app({"TESTING": False}, settings=settings, store=store)
    try:
        yield (
            app.test_client(),
            {"Authorization": "Bearer key-a", "Content-Type": "application/json"},
        )
    finally:
        store.close()
        if drop is not None:
            drop.drop(url)


DISPATCHER_CASES = [
    (
        "NUL in a question",
        '{"questions": ["' + SECRET + '\\u0000"], "models": ["m1"]}',
        "questions.0",
    ),
    ("lone surrogate", '{"questions": ["' + SECRET + '\\udfff"], "models": ["m1"]}', "questions.0"),
    ("deep nesting", '{"questions": ' + DEEP + ', "models": ["m1"]}', "_json"),
    (
        "4,300-digit integer",
        '{"questions": ["q"], "models": ["m1"], "priority": ' + HUGE_INT + "}",
        "priority",
    ),
    (
        "huge seed",
        '{"questions": ["q"], "models": ["m1"], "params": {"seed": 99999999999999999999}}',
        "params.seed",
    ),
    ("NUL in a model", '{"questions": ["q"], "models": ["m1\\u0000"]}', "models.0"),
]


@pytest.mark.parametrize(
    ("name", "raw", "field"), DISPATCHER_CASES, ids=[c[0] for c in DISPATCHER_CASES]
)
def test_dispatcher_refuses_hostile_json_with_422_on_both_stores(
    dispatcher: tuple[FlaskClient, dict[str, str]],
    name: str,
    raw: str,
    field: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    client, headers = dispatcher
    caplog.set_level(logging.DEBUG)
    r = client.post("/jobs", data=raw.encode(), headers=headers)
    assert_422_naming(r, field)
    assert_no_secret_logged(caplog)
    # and nothing was stored: the same client's jobs list is empty
    assert client.get("/queue", headers=headers).status_code == 200
