"""Request bodies parsed strictly: hostile JSON is a 422 naming the field, never a 500.

Python's ``json`` accepts things that break later, far from the request:

- nesting ~1,000 deep raises RecursionError inside the parser (was a 500);
- an integer of up to 4,300 digits parses, then overflows a float field, a SQL
  BIGINT or ``str()`` (Python's int-str limit); more digits raise in the parser;
- ``NaN`` and ``Infinity`` parse into floats that pass range checks (``nan < 0``
  and ``nan > 2`` are both false);
- a lone surrogate (``"\\ud800"``) is a Python str that cannot be encoded to UTF-8:
  SQLite, PostgreSQL and llama.cpp's tokenizer all fail on it (was a 500);
- NUL (``"\\u0000"``) cannot be stored in PostgreSQL text (was a 503
  store_unavailable, so clients retried a permanent error forever).

Each is refused here, before any schema, store or model sees it, with the path of
the field (``messages.0.content``) and never its content.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import Any, TypeVar

import flask
import flask_smorest
import marshmallow
from webargs import core
from webargs.flaskparser import FlaskParser, is_json_request

from .errors import InvalidJSON, PayloadTooLarge, ValidationFailed, not_json

F = TypeVar("F", bound=Callable[..., Any])

#: deepest nesting of objects and arrays a body may have (a job or a chat call needs 4)
MAX_DEPTH = 32
#: integers must fit a signed 64-bit column
MAX_INT = 2**63 - 1


class _Refused:
    """Stands in for a value the parser must not build (checked by :func:`_check`)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _parse_int(text: str) -> int | _Refused:
    # Checked on the digits: int() of 5,000 digits is itself the error.
    if len(text.lstrip("-")) > 19:
        return _Refused(f"integers must be within +/-{MAX_INT}")
    value = int(text)
    return (
        value
        if -MAX_INT - 1 <= value <= MAX_INT
        else _Refused(f"integers must be within +/-{MAX_INT}")
    )


def _parse_constant(name: str) -> _Refused:
    return _Refused(f"{name} is not a number JSON allows")


def _string_problem(text: str) -> str | None:
    if "\x00" in text:
        return "must not contain NUL (\\u0000)"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "must not contain a lone UTF-16 surrogate"
    return None


def _path(parts: list[str]) -> str:
    return ".".join(parts) or "_json"


def _check(value: Any, parts: list[str], depth: int) -> None:
    if isinstance(value, _Refused):
        raise ValidationFailed(details={_path(parts): [value.reason]})
    if isinstance(value, str):
        problem = _string_problem(value)
        if problem:
            raise ValidationFailed(details={_path(parts): [problem]})
        return
    if isinstance(value, dict | list):
        if depth >= MAX_DEPTH:
            raise ValidationFailed(
                details={_path(parts): [f"nested deeper than {MAX_DEPTH} levels"]}
            )
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            if isinstance(key, str):
                problem = _string_problem(key)
                if problem:
                    raise ValidationFailed(details={_path(parts): [f"a key {problem}"]})
            _check(item, [*parts, str(key)], depth + 1)


def loads(data: str | bytes) -> Any:
    """``json.loads`` that raises ValidationFailed (422) for hostile content and
    ValueError (400 invalid_json, through Flask) for what is not JSON at all."""
    try:
        value = json.loads(data, parse_int=_parse_int, parse_constant=_parse_constant)
    except RecursionError:
        raise ValidationFailed(
            details={"_json": [f"nested deeper than {MAX_DEPTH} levels"]}
        ) from None
    _check(value, [], 0)
    return value


class _StrictJSON:
    """The ``json_module`` of requests: strict loads, Flask's dumps."""

    @staticmethod
    def loads(data: str | bytes, **_: Any) -> Any:
        return loads(data)

    @staticmethod
    def dumps(obj: Any, **kwargs: Any) -> str:
        return flask.json.dumps(obj, **kwargs)


class StrictRequest(flask.Request):
    """Flask's request with bodies parsed by :func:`loads` (``request.get_json()``)."""

    json_module = _StrictJSON


class StrictParser(FlaskParser):
    """webargs' parser (``@blp.arguments``) with bodies parsed by :func:`loads`; what is
    not JSON at all still raises JSONDecodeError, which webargs answers 400."""

    def _raw_load_json(self, req: flask.Request) -> Any:
        if not is_json_request(req):
            return core.missing
        return loads(req.get_data(cache=True))


def load_body(load: Callable[[Any], Any]) -> Any:
    """The request's JSON body parsed by :func:`loads` and loaded by ``load`` (a schema's
    ``load``), answered as ``@blp.arguments(schema)``
    answers (415 not sent as JSON, 400 invalid_json, 422
    naming the fields) without webargs' and flask-smorest's per-request machinery, which
    cost /execute a tenth of its CPU per call (E1). An empty body is ``{}``, as in webargs."""
    request = flask.request
    if not is_json_request(request):
        raise not_json()
    data = request.get_data(cache=True)
    try:
        raw = loads(data) if data else {}
    except ValueError:  # JSONDecodeError, UnicodeDecodeError: webargs' 400, word for word
        raise InvalidJSON(details={"reason": ["Invalid JSON body."]}) from None
    try:
        return load(raw)
    except marshmallow.ValidationError as exc:
        raise ValidationFailed(details=exc.normalized_messages()) from None


class Blueprint(flask_smorest.Blueprint):
    """flask-smorest's Blueprint whose ``@blp.arguments`` bodies are parsed strictly.
    Every API blueprint uses this one (the parser is read when a route is declared)."""

    ARGUMENTS_PARSER = StrictParser()

    @staticmethod
    def documented(*decorators: Callable[[F], F]) -> Callable[[F], F]:
        """flask-smorest's decorators (``arguments``, ``response``, ``alt_response``,
        ``doc``) for the OpenAPI document only: the view gets what they document and none
        of their per-request wrappers, so it reads its own body (:func:`load_body`) and
        returns its own Response. Goes under ``@blp.route``, which reads the document."""

        def apply(func: F) -> F:
            wrapped: Any = func
            for decorator in reversed(decorators):
                wrapped = decorator(wrapped)
            func._apidoc = wrapped._apidoc  # type: ignore[attr-defined]
            return func

        return apply


def bound_chunked_body() -> None:
    """413 for a chunked body over MAX_CONTENT_LENGTH (a before_request hook).

    Werkzeug checks Content-Length; a chunked body has none, and it silently cut the
    body at the limit, so a 2 MB body came back as 400 invalid_json. Read it here,
    one byte past the limit at most, and hand the rest of Flask a sized body.
    """
    environ = flask.request.environ
    limit = flask.current_app.config.get("MAX_CONTENT_LENGTH")
    if (
        limit is None
        or environ.get("CONTENT_LENGTH")
        or "chunked" not in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
    ):
        return
    stream = environ["wsgi.input"]
    parts, size = [], 0
    while size <= limit:
        part = stream.read(min(65536, limit + 1 - size))
        if not part:
            break
        parts.append(part)
        size += len(part)
    if size > limit:
        raise PayloadTooLarge(details={"max_bytes": limit})
    body = b"".join(parts)
    environ["wsgi.input"] = io.BytesIO(body)
    environ["CONTENT_LENGTH"] = str(len(body))
    environ.pop("HTTP_TRANSFER_ENCODING", None)
    environ["wsgi.input_terminated"] = False


def init_app(app: flask.Flask) -> None:
    """Strict parsing for ``request.get_json()`` too; chunked bodies held to the limit."""
    app.request_class = StrictRequest
    app.before_request(bound_chunked_body)
