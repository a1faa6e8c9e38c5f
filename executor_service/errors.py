"""The API errors (on the package's one exception base, ``exceptions.py``) and the
handlers that give every error the same JSON shape.

Every error a client sees is ``{"error": {"code", "message", "details"}}``,
whether it is raised by our code, by Werkzeug (404 route, 405, 413), by
webargs/marshmallow (422) or is an uncaught exception (500, with no stack
trace sent to the client; the trace goes to the log and to Sentry).
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, jsonify, request
from marshmallow import Schema, fields
from werkzeug.exceptions import HTTPException, InternalServerError

from .exceptions import ExecutorServiceError

logger = logging.getLogger(__name__)


class APIError(ExecutorServiceError):
    """Something went wrong."""

    status = 500
    code = "internal"

    def __init__(
        self,
        message: str | None = None,
        *,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.message = message or (self.__doc__ or "").strip()
        self.details = details or {}
        self.headers = headers or {}
        super().__init__(self.message)


class InvalidJSON(APIError):
    """The request body is not valid JSON."""

    status, code = 400, "invalid_json"


class Unauthorized(APIError):
    """A valid bearer API key is required."""

    status, code = 401, "unauthorized"


class NotFound(APIError):
    """No such resource."""

    status, code = 404, "not_found"


class UnknownModel(APIError):
    """The model is not in the model catalog."""

    status, code = 404, "unknown_model"


class MethodNotAllowed(APIError):
    """This method is not allowed on this resource."""

    status, code = 405, "method_not_allowed"


class Conflict(APIError):
    """The request conflicts with the current state of the resource."""

    status, code = 409, "conflict"


class PayloadTooLarge(APIError):
    """The request body is larger than the server accepts."""

    status, code = 413, "payload_too_large"


class UnsupportedMediaType(APIError):
    """The request body must be JSON: send it with the header Content-Type: application/json."""

    status, code = 415, "unsupported_media_type"


class ValidationFailed(APIError):
    """The request is not valid; see details for the fields."""

    status, code = 422, "validation_error"


class RateLimited(APIError):
    """The model provider refused for rate; retry after the delay in Retry-After."""

    status, code = 429, "rate_limited"


class Overloaded(APIError):
    """The server is at capacity; retry after the delay in Retry-After."""

    status, code = 503, "overloaded"


class NotReady(APIError):
    """The server is not ready to serve (starting or draining)."""

    status, code = 503, "not_ready"


class ModelTimeout(APIError):
    """The model did not answer before the deadline."""

    status, code = 504, "model_timeout"


class ProviderError(APIError):
    """The model provider failed."""

    status, code = 502, "provider_error"


class ClientGone(APIError):
    """The client closed the connection before the answer; the call was stopped."""

    # nginx's "client closed request": never read by the client, seen in logs and metrics.
    status, code = 499, "client_gone"


class Internal(APIError):
    """An internal error occurred; it has been logged."""

    status, code = 500, "internal"


class ErrorBodySchema(Schema):
    code = fields.String(required=True, metadata={"description": "stable, machine-readable"})
    message = fields.String(required=True)
    details = fields.Dict(required=True, metadata={"description": "per code; {} when none"})


class ErrorResponseSchema(Schema):
    """Every error answer: ``{"error": {"code", "message", "details"}}`` (the OpenAPI
    documents' default response, so they show what the wire carries)."""

    error = fields.Nested(ErrorBodySchema, required=True)


def error_response(err: APIError) -> Response:
    """Render an APIError as the contract's JSON error body."""
    body = {"error": {"code": err.code, "message": err.message, "details": err.details}}
    response = jsonify(body)
    response.status_code = err.status
    for name, value in err.headers.items():
        response.headers[name] = value
    return response


def not_json() -> UnsupportedMediaType:
    """The 415 for a request whose body is not sent as JSON (curl -d sends form encoding)."""
    sent = f"Content-Type: {request.mimetype}" if request.mimetype else "no Content-Type"
    return UnsupportedMediaType(
        "the request body must be JSON: send it with the header "
        f"'Content-Type: application/json' (this request had {sent})",
        details={"content_type": request.mimetype or None, "expected": "application/json"},
    )


_HTTP_TO_API: dict[int, type[APIError]] = {
    400: InvalidJSON,
    401: Unauthorized,
    404: NotFound,
    405: MethodNotAllowed,
    409: Conflict,
    413: PayloadTooLarge,
    422: ValidationFailed,
    429: RateLimited,
    503: Overloaded,
}


def _from_http_exception(exc: HTTPException) -> APIError:
    status = exc.code or 500
    # webargs puts field messages in exc.data["messages"], keyed by location.
    data = getattr(exc, "data", None) or {}
    messages = data.get("messages") if isinstance(data, dict) else None
    if messages is not None and isinstance(messages, dict) and len(messages) == 1:
        messages = next(iter(messages.values()))
    cls = _HTTP_TO_API.get(status)
    if cls is None:
        err = APIError(exc.description or exc.name, details={})
        err.status, err.code = status, exc.name.lower().replace(" ", "_")
        return err
    if status == 400:
        return InvalidJSON(details={"reason": messages or exc.description})
    if status == 422:
        webargs_messages = data.get("messages")
        if (
            isinstance(webargs_messages, dict)
            and "json" in webargs_messages
            and not request.is_json
        ):
            # webargs reads a body sent without a JSON Content-Type (curl -d sends form
            # encoding) as no body: say what to send, not which fields are missing.
            return not_json()
        return ValidationFailed(details=messages or {})
    if status == 405:
        return MethodNotAllowed(details={"allowed": sorted(exc.valid_methods or [])})  # type: ignore[attr-defined]
    return cls()


def register_error_handlers(app: Flask) -> None:
    """Install the handlers; call after any extension that registers its own."""

    @app.errorhandler(APIError)
    def _api_error(err: APIError) -> Response:
        return error_response(err)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        if isinstance(exc, InternalServerError):
            return _internal(exc)
        return error_response(_from_http_exception(exc))

    # Uncaught exceptions reach this handler through Flask's handle_exception,
    # which first logs the trace and sends got_request_exception (Sentry captures there).
    @app.errorhandler(InternalServerError)
    def _internal(exc: InternalServerError) -> Response:
        return error_response(Internal())
