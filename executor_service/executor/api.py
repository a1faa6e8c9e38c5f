"""The executor's HTTP API: ``POST /execute``, ``GET /models``, ``GET /ready``."""

from __future__ import annotations

import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from flask import Flask, Response, current_app, g, jsonify, request

from ..errors import NotReady, ValidationFailed
from ..jsonbody import Blueprint, load_body
from .admission import Admission
from .calls import ModelCall, record, run_call
from .catalog import Catalog
from .config import ExecutorSettings
from .schemas import (
    REQUEST_ID_PATTERN,
    ExecuteRequestSchema,
    ExecuteResponseSchema,
    ModelListSchema,
)

logger = logging.getLogger(__name__)
_REQUEST_ID = re.compile(REQUEST_ID_PATTERN)

blp = Blueprint("executor", __name__, description="Run one model call synchronously.")


@dataclass
class ExecutorState:
    """What the executor routes need, kept in ``app.extensions["executor"]``."""

    settings: ExecutorSettings
    catalog: Catalog
    admission: Admission
    draining: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def state() -> ExecutorState:
    st: ExecutorState = current_app.extensions["executor"]
    return st


def request_id(given: str | None = None) -> str:
    """The call's id: the one given in the body, else the X-Request-ID header, else new.
    The header is held to the body's rule (422 otherwise): it is echoed and logged."""
    if given:
        return given
    header = request.headers.get("X-Request-ID")
    if header is None:
        return uuid.uuid4().hex
    if not _REQUEST_ID.fullmatch(header):
        raise ValidationFailed(
            details={"X-Request-ID": [f"must match {REQUEST_ID_PATTERN} (or be absent)"]}
        )
    return header


def _header_request_id() -> str | None:
    """The X-Request-ID header when valid: echoed on errors raised before the call was
    read (a body cut short by a client that died mid-send is answered 400 under the
    id it was sent with, so its log line names the call)."""
    header = request.headers.get("X-Request-ID")
    return header if header and _REQUEST_ID.fullmatch(header) else None


EXECUTE_REQUEST = ExecuteRequestSchema()


# A plain Flask view, documented by flask-smorest's decorators but run without their
# per-request wrappers (webargs' parser, the response wrapper, one layer per
# alt_response): they were a tenth of the executor's CPU per call (E1). The body gets
# the same strict parsing and the same answers (jsonbody.load_body).
@blp.route("/execute", methods=["POST"])
@blp.documented(
    blp.arguments(EXECUTE_REQUEST),
    blp.response(200, ExecuteResponseSchema()),
    blp.alt_response(404, description="unknown_model"),
    blp.alt_response(
        429,
        description="rate_limited: the provider refused for rate; retry after Retry-After "
        "seconds (details: provider_status, retry_after_s, ratelimit remaining/reset)",
    ),
    blp.alt_response(503, description="overloaded: retry after Retry-After seconds"),
    blp.alt_response(504, description="model_timeout"),
    blp.alt_response(502, description="provider_error"),
)
def execute() -> Response:
    """Run one model call and answer with its output, usage and timing."""
    body: dict[str, Any] = load_body(EXECUTE_REQUEST.load)
    st = state()
    messages = body.get("messages") or [{"role": "user", "content": body["prompt"]}]
    outcome = run_call(
        ModelCall(
            model=body["model"],
            messages=messages,
            max_tokens=body["max_tokens"],
            temperature=body["temperature"],
            seed=body["seed"],
            timeout_s=body["timeout_s"],
            request_id=request_id(body.get("request_id")),
            input_field="messages" if body.get("messages") else "prompt",
        )
    )
    completion = outcome.completion
    # Built to ExecuteResponseSchema's shape and returned as a Response, so flask-smorest
    # documents the schema without dumping every answer through marshmallow again
    # (a tenth of the per-call overhead); the contract tests check the shape.
    return jsonify(
        {
            "request_id": g.request_id,
            "model": body["model"],
            "provider": outcome.provider,
            "region": st.settings.region,
            "replica": st.settings.replica,
            "output": completion.output,
            "finish_reason": completion.finish_reason,
            "usage": {
                "prompt_tokens": completion.prompt_tokens,
                "completion_tokens": completion.completion_tokens,
            },
            "timing": outcome.timing(),
        }
    )


@blp.route("/models", methods=["GET"])
@blp.response(200, ModelListSchema)
def models() -> dict[str, Any]:
    """The models this replica serves."""
    st = state()
    loaded = set(st.catalog._providers)
    return {
        "region": st.settings.region,
        "models": [
            {
                "name": e.name,
                "provider": e.provider,
                "description": e.description,
                "loaded": e.name in loaded,
            }
            for e in st.catalog.entries.values()
        ],
    }


@blp.route("/ready", methods=["GET"])
@blp.doc(security=[])  # public: platforms probe it without credentials (auth.PUBLIC_PATHS)
@blp.response(200)
@blp.alt_response(503, description="not_ready: models loading or draining")
def ready() -> dict[str, Any]:
    """Ready when every model is loaded in this worker and it is not draining."""
    st = state()
    if st.draining:
        raise NotReady("draining: finishing in-flight calls", details={"draining": True})
    if not st.catalog.loaded:
        st.catalog.load_all()
    return {"status": "ready", "region": st.settings.region, "models": st.catalog.names()}


#: the endpoints whose requests are model calls: counted, timed and logged per call
CALL_ENDPOINTS = {"executor.execute"}


def _observe(response: Response) -> Response:
    if request.endpoint not in CALL_ENDPOINTS:
        return response
    rid = g.get("request_id") or _header_request_id()
    if rid:
        response.headers["X-Request-ID"] = rid
    if g.get("streamed"):  # counted when the stream ends (calls.Stream.close)
        return response
    record(
        g.get("model", "unknown"),
        response.status_code,
        time.monotonic() - g.started,
        request_id=rid,
        model_ms=g.get("model_ms", 0.0),
        tenant=g.get("tenant"),
    )
    return response


def init_app(app: Flask, settings: ExecutorSettings, api: Any) -> None:
    catalog = Catalog.load(settings.catalog_path)
    limit = settings.max_in_flight or 8
    app.extensions["executor"] = ExecutorState(
        settings=settings,
        catalog=catalog,
        admission=Admission(limit, settings.retry_after_s, settings.admission_dir),
    )
    app.after_request(_observe)
    api.register_blueprint(blp)
    from . import openai_api

    openai_api.init_app(app, api)
