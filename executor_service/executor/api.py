"""The executor's HTTP API: ``POST /execute``, ``GET /models``, ``GET /ready``."""

from __future__ import annotations

import logging
import re
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import sentry_sdk
from flask import Flask, Response, current_app, g, jsonify, request

from ..errors import ClientGone, NotReady, UnknownModel, ValidationFailed
from ..jsonbody import Blueprint
from .admission import Admission
from .catalog import Catalog
from .config import ExecutorSettings
from .metrics import MODEL_SECONDS, REQUEST_SECONDS, REQUESTS
from .provider_errors import api_error
from .providers import Call, ProviderCancelled, ProviderFailure, ProviderTimeout
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


def _request_id(body: dict[str, Any]) -> str:
    """The body's request_id, else the X-Request-ID header, else a new one. The header
    is held to the body's rule (422 otherwise): it is echoed and logged."""
    if body.get("request_id"):
        return str(body["request_id"])
    header = request.headers.get("X-Request-ID")
    if header is None:
        return uuid.uuid4().hex
    if not _REQUEST_ID.fullmatch(header):
        raise ValidationFailed(
            details={"X-Request-ID": [f"must match {REQUEST_ID_PATTERN} (or be absent)"]}
        )
    return header


def _watch_client(cancel: threading.Event) -> Callable[[], None]:
    """Set ``cancel`` if the client closes its connection while the call runs; returns
    the function that stops watching.

    Under gevent (the default worker) a greenlet peeks at the client's socket: the
    client sends nothing while it waits for its answer, so the socket turns readable
    only when it is closed (recv gives b""). The llama_cpp and simulated providers
    then stop within a token; nobody would read their answer. Under gthread (no
    spare thread to watch with) calls run to their deadline, as before.
    """
    sock = request.environ.get("gunicorn.socket")
    monkey = sys.modules.get("gevent.monkey")
    if sock is None or monkey is None or not monkey.is_module_patched("socket"):
        return lambda: None
    import gevent

    rid = g.get("request_id")  # the greenlet below runs outside the request context

    def watch() -> None:
        try:
            data = sock.recv(1, socket.MSG_PEEK)
        except OSError:
            data = b""
        if not data:
            logger.info("client gone: stopping the call", extra={"request_id": rid})
            cancel.set()

    watcher = gevent.spawn(watch)
    # block: the watcher must be gone before gunicorn reads the next request on the socket
    # (two greenlets waiting on one socket is an error, answered 500 on keep-alive)
    return lambda: watcher.kill(block=True)


# Schema instances, not classes: webargs would build a schema per request, which
# was a third of the executor's own overhead per call (E1).
@blp.route("/execute", methods=["POST"])
@blp.arguments(ExecuteRequestSchema())
@blp.response(200, ExecuteResponseSchema())
@blp.alt_response(404, description="unknown_model")
@blp.alt_response(
    429,
    description="rate_limited: the provider refused for rate; retry after Retry-After "
    "seconds (details: provider_status, retry_after_s, ratelimit remaining/reset)",
)
@blp.alt_response(503, description="overloaded: retry after Retry-After seconds")
@blp.alt_response(504, description="model_timeout")
@blp.alt_response(502, description="provider_error")
def execute(body: dict[str, Any]) -> Response:
    """Run one model call and answer with its output, usage and timing."""
    started = g.started
    st = state()
    g.request_id = _request_id(body)
    model = body["model"]
    if model not in st.catalog:
        raise UnknownModel(
            f"model {model!r} is not in the catalog",
            details={"model": model, "available": st.catalog.names()},
        )
    g.model = model
    sentry_sdk.set_tag("model", model)
    settings = st.settings
    budget = min(body["timeout_s"] or settings.timeout_cap_s, settings.timeout_cap_s)
    messages = body.get("messages") or [{"role": "user", "content": body["prompt"]}]
    with st.admission.slot():
        provider = st.catalog.provider(model)
        call = Call(
            messages=messages,
            max_tokens=body["max_tokens"],
            temperature=body["temperature"],
            seed=body["seed"],
            deadline=time.monotonic() + budget,
            request_id=g.request_id,
        )
        model_started = time.monotonic()
        stop_watching = _watch_client(call.cancel)
        try:
            completion = provider.complete(call)
        except ProviderCancelled as exc:
            raise ClientGone(details={"reason": str(exc)}) from None
        except (ProviderTimeout, ProviderFailure) as exc:
            field = "messages" if body.get("messages") else "prompt"
            raise api_error(
                exc, provider=provider.kind, model=model, timeout_s=budget, field=field
            ) from None
        finally:
            stop_watching()
            MODEL_SECONDS.labels(model).observe(time.monotonic() - model_started)
    finished = time.monotonic()
    g.model_ms = (finished - model_started) * 1000
    # Built to ExecuteResponseSchema's shape and returned as a Response, so flask-smorest
    # documents the schema without dumping every answer through marshmallow again
    # (a tenth of the per-call overhead); the contract tests check the shape.
    return jsonify(
        {
            "request_id": g.request_id,
            "model": model,
            "provider": provider.kind,
            "region": settings.region,
            "replica": settings.replica,
            "output": completion.output,
            "finish_reason": completion.finish_reason,
            "usage": {
                "prompt_tokens": completion.prompt_tokens,
                "completion_tokens": completion.completion_tokens,
            },
            "timing": {
                "queue_ms": round((model_started - started) * 1000, 3),
                "model_ms": round(g.model_ms, 3),
                "total_ms": round((finished - started) * 1000, 3),
            },
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


def _observe(response: Response) -> Response:
    if request.endpoint != "executor.execute":
        return response
    model = g.get("model", "unknown")
    total = time.monotonic() - g.started
    REQUESTS.labels(model, str(response.status_code)).inc()
    REQUEST_SECONDS.labels(model).observe(total)
    rid = g.get("request_id")
    if rid:
        response.headers["X-Request-ID"] = rid
    logger.info(
        "execute",
        extra={
            "request_id": rid,
            "model": model,
            "status": response.status_code,
            "total_ms": round(total * 1000, 3),
            "model_ms": round(g.get("model_ms", 0.0), 3),
            "tenant": g.get("tenant"),
        },
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
