"""A job's results as files: JSONL (one execution per line, every field) and CSV (the
same columns, nested values as JSON), times in ISO-8601 UTC.

Both are written from execution views (``results.execution_view``) a chunk at a time, so
a job of 100,000 executions streams without being held in memory.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

View = Mapping[str, Any]

# One column per field a researcher filters or joins on; nested values (messages,
# usage, attempt_log) are JSON text in CSV and nested objects in JSONL.
COLUMNS = (
    "job_id",
    "execution_id",
    "question_index",
    "question",
    "messages",
    "model",
    "requested_region",
    "executed_region",
    "sample",
    "state",
    "attempts",
    "attempts_total",
    "output",
    "finish_reason",
    "prompt_tokens",
    "completion_tokens",
    "usage",
    "errors",
    "last_error",
    "created_at",
    "finished_at",
    "model_ms",
    "total_ms",
    "replica",
    "attempt_log",
    "waiting_reason",
)


def iso(t: float | None) -> str | None:
    """Seconds since the epoch as ISO-8601 UTC with milliseconds (None stays None)."""
    if t is None:
        return None
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def attempt_errors(view: View) -> str:
    """Every failed attempt in one line: ``#n region: code: message | ...``."""
    parts = []
    for a in view["attempt_log"]:
        if a["error"]:
            err = a["error"]
            parts.append(f"#{a['number']} {a['region']}: {err.get('code')}: {err.get('message')}")
    return " | ".join(parts)


def record(view: View, job_id: str) -> dict[str, Any]:
    """One execution of ``job_id`` as an export record, keys in ``COLUMNS`` order."""
    usage = view.get("usage") or {}
    timing = view.get("timing") or {}
    return {
        "job_id": job_id,
        "execution_id": view["id"],
        "question_index": view["question_index"],
        "question": view["question"],
        "messages": view.get("messages"),
        "model": view["model"],
        "requested_region": view["requested_region"],
        "executed_region": view["executed_region"],
        "sample": view.get("sample", 0),
        "state": view["state"],
        "attempts": view["attempts"],
        "attempts_total": view.get("attempts_total", view["attempts"]),
        "output": view["output"],
        "finish_reason": view.get("finish_reason"),
        "prompt_tokens": usage.get("prompt_tokens"),
        "completion_tokens": usage.get("completion_tokens"),
        "usage": view.get("usage"),
        "errors": attempt_errors(view),
        "last_error": view.get("last_error"),
        "created_at": iso(view["created_at"]),
        "finished_at": iso(view["finished_at"]),
        "model_ms": timing.get("model_ms"),
        "total_ms": timing.get("total_ms"),
        "replica": view.get("replica"),
        "attempt_log": [
            {**a, "started_at": iso(a["started_at"]), "finished_at": iso(a["finished_at"])}
            for a in view["attempt_log"]
        ],
        "waiting_reason": view.get("waiting_reason"),
    }


def jsonl_lines(views: Iterable[View], job_id: str) -> Iterator[str]:
    """One JSON object per line, every field."""
    for view in views:
        yield json.dumps(record(view, job_id), ensure_ascii=False, separators=(",", ":")) + "\n"


# A spreadsheet runs a cell that starts with one of these as a formula (OWASP's CSV
# injection list): a model's output or a tenant's question could be "=HYPERLINK(...)".
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_safe(value: Any) -> Any:
    """A text cell a spreadsheet shows as text: a leading ' before a formula start."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return csv_safe(value)


def csv_chunks(views: Iterable[View], job_id: str) -> Iterator[str]:
    """The header, then one row per execution, as text chunks to stream."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(COLUMNS)
    for view in views:
        writer.writerow([_cell(v) for v in record(view, job_id).values()])
        yield buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
    yield buffer.getvalue()


def wide_csv(header: list[str], rows: Iterable[list[Any]]) -> str:
    """A table (``compare.wide_rows``) as CSV text."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows([[_cell(v) for v in row] for row in rows])
    return buffer.getvalue()
