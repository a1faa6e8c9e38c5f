"""OpenAI-compatible routes of the executor: ``POST /v1/chat/completions``, ``GET /v1/models``.

They let the official ``openai`` client, LiteLLM or promptfoo use a region
directly. This layer only translates shapes: the call itself goes through
:mod:`.calls`, the path ``/execute`` takes, so admission (503 at once when
full), the deadline, the status codes and the metrics are the same. Errors
keep the contract's status and code and are written in OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}`` (plus our ``details``),
so the client raises its matching exception class.

``stream: true`` answers with server-sent events in OpenAI's chunk format,
ended by ``data: [DONE]``. The first chunk is read from the provider before
the response starts, so a call that fails at once still gets its status
code; a failure later in the stream is sent as an ``error`` event (the
``openai`` client raises it). The admission slot and the deadline hold until
the stream ends: a stream occupies a gunicorn thread for at most its deadline,
and when the client goes away the server's next write fails, gunicorn closes
the response and the ``finally`` below frees the model and the slot. A client
that stays but stops reading cannot hold it longer either: each write is
bounded by the deadline (plus ``WRITE_GRACE_S``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Generator, Iterator
from typing import Any

import sentry_sdk
from flask import Flask, Response, g, jsonify, request

from .. import openai_errors
from ..errors import APIError, Internal, UnknownModel
from ..jsonbody import Blueprint
from ..openai_errors import openai_error_body
from .api import CALL_ENDPOINTS, request_id, state
from .calls import ModelCall, Stream, open_stream, run_call
from .openai_schemas import (
    DEFAULT_MAX_TOKENS,
    OPENAI_DEFAULT_TEMPERATURE,
    ChatCompletionRequestSchema,
    ChatCompletionSchema,
    OpenAIErrorSchema,
    OpenAIModelListSchema,
    OpenAIModelSchema,
)

logger = logging.getLogger(__name__)

#: how long past its deadline a stream's write to a client that stopped reading may block
WRITE_GRACE_S = 1.0

blp = Blueprint(
    "openai",
    __name__,
    url_prefix="/v1",
    description="OpenAI-compatible chat completions and models (the same calls as /execute).",
)

openai_errors.install(blp)


def _model_call(body: dict[str, Any]) -> ModelCall:
    temperature = body["temperature"]
    return ModelCall(
        model=body["model"],
        messages=[
            {"role": "system" if m["role"] == "developer" else m["role"], "content": m["content"]}
            for m in body["messages"]
        ],
        max_tokens=body["max_completion_tokens"] or body["max_tokens"] or DEFAULT_MAX_TOKENS,
        temperature=OPENAI_DEFAULT_TEMPERATURE if temperature is None else temperature,
        seed=body["seed"],
        timeout_s=body["timeout_s"],
        request_id=request_id(),
        input_field="messages",
    )


@blp.route("/chat/completions", methods=["POST"])
@blp.arguments(ChatCompletionRequestSchema())
@blp.response(200, ChatCompletionSchema())
@blp.alt_response(404, schema=OpenAIErrorSchema, description="unknown_model")
@blp.alt_response(
    422,
    schema=OpenAIErrorSchema,
    description="validation_error, or a parameter this server does not support",
)
@blp.alt_response(503, schema=OpenAIErrorSchema, description="overloaded: retry after Retry-After")
@blp.alt_response(504, schema=OpenAIErrorSchema, description="model_timeout")
@blp.alt_response(502, schema=OpenAIErrorSchema, description="provider_error")
def chat_completions(body: dict[str, Any]) -> Response:
    """One chat completion, as OpenAI answers it; with ``stream: true``, server-sent events
    of ``chat.completion.chunk`` objects ended by ``data: [DONE]``."""
    mc = _model_call(body)
    created = int(time.time())
    if body["stream"]:
        stream = open_stream(mc)
        include_usage = bool((body["stream_options"] or {}).get("include_usage"))
        events = _events(stream, created, include_usage, request.environ.get("gunicorn.socket"))
        return Response(
            _Body(events, stream),
            mimetype="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    outcome = run_call(mc)
    completion = outcome.completion
    settings = state().settings
    return jsonify(
        {
            "id": f"chatcmpl-{g.request_id}",
            "object": "chat.completion",
            "created": created,
            "model": mc.model,
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": completion.output,
                        "refusal": None,
                    },
                    "logprobs": None,
                    "finish_reason": completion.finish_reason,
                }
            ],
            "usage": {
                "prompt_tokens": completion.prompt_tokens,
                "completion_tokens": completion.completion_tokens,
                "total_tokens": completion.prompt_tokens + completion.completion_tokens,
            },
            "system_fingerprint": None,
            "executor": {
                "request_id": g.request_id,
                "provider": outcome.provider,
                "region": settings.region,
                "replica": settings.replica,
                "timing": outcome.timing(),
            },
        }
    )


class _Body:
    """The response body: the events, and a ``close`` the server always calls (WSGI) that
    also closes the stream, so its slot is freed even if the body was never iterated
    (a generator that never started ignores ``close``)."""

    def __init__(self, events: Generator[str, None, None], stream: Stream) -> None:
        self.events, self.stream = events, stream

    def __iter__(self) -> Iterator[str]:
        return self.events

    def close(self) -> None:
        try:
            self.events.close()
        finally:
            self.stream.close()


def _events(
    stream: Stream, created: int, include_usage: bool, sock: Any = None
) -> Generator[str, None, None]:
    """The SSE body. Runs after the view returned, outside the request context: it uses
    only what it is given. Its ``finally`` runs when the stream ends, fails, or is closed
    by the server because the client went away.

    ``sock`` is gunicorn's client socket: gunicorn writes with no timeout, so a client
    that stops reading would block a write, and the thread, once the socket buffers are
    full. Before each event its timeout is set to what is left of the deadline (plus
    WRITE_GRACE_S), so the write fails instead, gunicorn closes the response and the
    ``finally`` frees the slot."""
    events = _chunks(stream, created, include_usage)
    previous = sock.gettimeout() if sock is not None else None
    try:
        for event in events:
            if sock is not None:
                sock.settimeout(max(0.0, stream.deadline - time.monotonic()) + WRITE_GRACE_S)
            yield event
    finally:
        events.close()
        if sock is not None:
            with contextlib.suppress(OSError):  # already closed
                sock.settimeout(previous)


def _chunks(stream: Stream, created: int, include_usage: bool) -> Generator[str, None, None]:
    """The SSE events of the stream, its error event if it fails, and the stream closed
    at the end whatever happens."""
    base = {
        "id": f"chatcmpl-{stream.mc.request_id}",
        "object": "chat.completion.chunk",
        "created": created,
        "model": stream.mc.model,
        "system_fingerprint": None,
    }

    def event(choices: list[dict[str, Any]], **extra: Any) -> str:
        body = {**base, "choices": choices, **extra}
        if include_usage and "usage" not in extra:
            body["usage"] = None
        return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"

    def choice(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

    try:
        yield event([choice({"role": "assistant", "content": ""})])
        for chunk in stream:
            if chunk.text:
                yield event([choice({"content": chunk.text})])
            if chunk.finish_reason is not None:
                yield event([choice({}, chunk.finish_reason)])
                if include_usage:
                    prompt, completion = stream.usage
                    usage = {
                        "prompt_tokens": prompt,
                        "completion_tokens": completion,
                        "total_tokens": prompt + completion,
                    }
                    yield event([], usage=usage)
        yield "data: [DONE]\n\n"
    except APIError as err:
        yield f"data: {json.dumps(openai_error_body(err), separators=(',', ':'))}\n\n"
    except Exception:
        # A bug after the answer started: the status line is sent, so the client learns
        # it from an error event (no trace); the trace goes to the log and to Sentry.
        logger.exception("stream failed", extra={"request_id": stream.mc.request_id})
        sentry_sdk.capture_exception()
        yield f"data: {json.dumps(openai_error_body(Internal()), separators=(',', ':'))}\n\n"
    finally:
        stream.close()


def _model(name: str) -> dict[str, Any]:
    st = state()
    entry = st.catalog.entries[name]
    return {
        "id": name,
        "object": "model",
        "created": st.extra["created"],
        "owned_by": entry.provider,
    }


@blp.route("/models", methods=["GET"])
@blp.response(200, OpenAIModelListSchema)
def list_models() -> dict[str, Any]:
    """The models this replica serves, as OpenAI lists them (``owned_by`` is the provider)."""
    return {"object": "list", "data": [_model(name) for name in state().catalog.names()]}


@blp.route("/models/<path:model_id>", methods=["GET"])
@blp.response(200, OpenAIModelSchema)
@blp.alt_response(404, schema=OpenAIErrorSchema, description="unknown_model")
def retrieve_model(model_id: str) -> dict[str, Any]:
    """One model, as OpenAI describes it."""
    catalog = state().catalog
    if model_id not in catalog:
        raise UnknownModel(
            f"model {model_id!r} is not in the catalog",
            details={"model": model_id, "available": catalog.names()},
        )
    return _model(model_id)


def init_app(app: Flask, api: Any) -> None:
    # The model objects' `created`: when this process loaded the catalog.
    app.extensions["executor"].extra.setdefault("created", int(time.time()))
    CALL_ENDPOINTS.add("openai.chat_completions")
    api.register_blueprint(blp)
