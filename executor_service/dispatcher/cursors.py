"""Opaque page cursors (``next_cursor``): a page's last ordering key, as URL-safe text.

Both listings that page by key use them: the tenant's jobs (``GET /jobs``, by
created_at and id) and a job's results (``GET /jobs/<id>/results``, by
``Execution.key``). A client passes ``next_cursor`` back as it came; a cursor this API
did not give out is a 422 naming ``cursor``.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from ..errors import ValidationFailed

K = TypeVar("K")


def encode(key: Sequence[Any]) -> str:
    """The position after ``key`` (JSON values), opaque to clients."""
    raw = json.dumps(list(key), separators=(",", ":"), ensure_ascii=False).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode(cursor: str, parse: Callable[[list[Any]], K]) -> K:
    """A cursor back to its key through ``parse`` (which raises ValueError, TypeError or
    KeyError on a key of another shape); ValidationFailed if it was not ours."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        values = json.loads(raw)
        if not isinstance(values, list):
            raise TypeError("not a list")
        return parse(values)
    except (binascii.Error, ValueError, TypeError, KeyError):
        raise ValidationFailed(
            details={"cursor": ["not a cursor this API gave out (use next_cursor)"]}
        ) from None
