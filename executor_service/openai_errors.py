"""Errors in OpenAI's shape, for the OpenAI-compatible routes of both roles (the executor's
``/v1/chat/completions``, the dispatcher's ``/v1/files`` and ``/v1/batches``).

The status and ``code`` stay the contract's (``errors.py``); the body is OpenAI's
``{"error": {"message", "type", "param", "code"}}`` plus our ``details``, so the
official client raises its matching exception class (NotFoundError for 404,
UnprocessableEntityError for 422, ...) with our message and code.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify
from werkzeug.exceptions import HTTPException, InternalServerError

from .errors import APIError, Internal, _from_http_exception

#: OpenAI's error ``type`` for each status the contract answers with (5xx: server_error).
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


def flatten_messages(messages: Any, path: str = "") -> list[tuple[str, str]]:
    """marshmallow's nested messages as (dotted.field, message) pairs."""
    if isinstance(messages, dict):
        out: list[tuple[str, str]] = []
        for key, value in messages.items():
            name = str(key) if key != "_schema" else ""
            out += flatten_messages(value, f"{path}.{name}".strip(".") if name else path)
        return out
    if isinstance(messages, list) and all(isinstance(m, str) for m in messages):
        return [(path, " ".join(messages))]
    if isinstance(messages, list):
        return [pair for m in messages for pair in flatten_messages(m, path)]
    return [(path, str(messages))]


def openai_error_body(err: APIError) -> dict[str, Any]:
    """An APIError in OpenAI's error shape; ``param`` names the first field at fault."""
    param: str | None = None
    message = err.message
    if err.status == 422 and err.details:
        pairs = flatten_messages(err.details)
        param = next((name for name, _ in pairs if name), None)
        message = "; ".join(f"{name}: {text}" if name else text for name, text in pairs)
    kind = ERROR_TYPES.get(err.status, "server_error" if err.status >= 500 else "invalid_request")
    return {
        "error": {
            "message": message,
            "type": kind,
            "param": param,
            "code": err.code,
            "details": err.details,
        }
    }


def openai_error_response(err: APIError) -> Response:
    response = jsonify(openai_error_body(err))
    response.status_code = err.status
    for name, value in err.headers.items():
        response.headers[name] = value
    return response


def install(blp: Blueprint) -> None:
    """Render every error of ``blp``'s routes in OpenAI's shape. Blueprint handlers come
    before the app's for a request routed to the blueprint, including errors raised by
    the app's before_request hooks (401) and uncaught exceptions (500, no trace sent)."""

    @blp.errorhandler(APIError)
    def _api_error(err: APIError) -> Response:
        return openai_error_response(err)

    @blp.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        if isinstance(exc, InternalServerError):
            return openai_error_response(Internal())
        return openai_error_response(_from_http_exception(exc))

    @blp.errorhandler(InternalServerError)
    def _internal(exc: InternalServerError) -> Response:
        return openai_error_response(Internal())
