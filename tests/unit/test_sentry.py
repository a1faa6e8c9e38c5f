"""Sentry: unexpected provider exceptions are captured, tagged, and carry no prompt text."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sentry_sdk
from sentry_sdk.envelope import Envelope
from sentry_sdk.transport import Transport

from executor_service import create_app
from executor_service.config import Settings

SECRET_PROMPT = "the launch code is 0000-TOP-SECRET"


class CaptureTransport(Transport):
    """Keeps envelopes in memory instead of sending them."""

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        super().__init__(options)
        self.envelopes: list[Envelope] = []

    def capture_envelope(self, envelope: Envelope) -> None:
        self.envelopes.append(envelope)

    def events(self) -> list[dict[str, Any]]:
        return [e.get_event() for e in self.envelopes if e.get_event() is not None]  # type: ignore[misc]


@pytest.fixture
def sentry_app(catalog_path: Path) -> Iterator[tuple[Any, CaptureTransport]]:
    def make(allow_prompts: bool) -> Any:
        transport = CaptureTransport()
        env = {
            "ES_CATALOG": str(catalog_path),
            "ES_REGION": "eu-west",
            "SENTRY_DSN": "https://public@sentry.example.invalid/1",
            "ES_SENTRY_SEND_PROMPTS": "true" if allow_prompts else "false",
        }
        app = create_app({"SENTRY_TRANSPORT": transport}, settings=Settings.from_env(environ=env))
        return app, transport

    yield make  # type: ignore[misc]
    sentry_sdk.get_client().close()
    sentry_sdk.init()  # back to a disabled client


def test_provider_exception_is_captured_with_tags_and_without_prompt(sentry_app: Any) -> None:
    app, transport = sentry_app(False)
    r = app.test_client().post("/execute", json={"model": "sim-bug", "prompt": SECRET_PROMPT})
    assert r.status_code == 500
    sentry_sdk.flush()
    events = transport.events()
    assert len(events) == 1
    event = events[0]
    assert event["tags"]["region"] == "eu-west"
    assert event["tags"]["model"] == "sim-bug"
    assert event["exception"]["values"][-1]["type"] == "RuntimeError"
    assert SECRET_PROMPT not in json.dumps(event, default=str)


def test_prompts_reach_sentry_only_when_allowed(sentry_app: Any) -> None:
    app, transport = sentry_app(True)
    app.test_client().post("/execute", json={"model": "sim-bug", "prompt": SECRET_PROMPT})
    sentry_sdk.flush()
    (event,) = transport.events()
    assert SECRET_PROMPT in json.dumps(event, default=str)


def test_expected_errors_are_not_sent(sentry_app: Any) -> None:
    app, transport = sentry_app(False)
    client = app.test_client()
    client.post("/execute", json={"model": "sim-5xx", "prompt": "x"})
    client.post("/execute", json={"model": "nope", "prompt": "x"})
    client.post("/execute", json={"model": "sim"})
    sentry_sdk.flush()
    assert transport.events() == []
