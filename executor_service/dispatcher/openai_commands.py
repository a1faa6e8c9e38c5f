"""The CLI's side of the OpenAI Batch API: ``submit batch.jsonl`` uploads the file and
creates a batch; ``results ID --format openai-batch`` prints OpenAI Batch output lines,
for a batch (its output file, then its error file) or for a plain job (one line per
execution, ``custom_id`` being the question's index)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from .api_client import CLIError, DispatcherAPI
from .commands import FOLLOW_POLL_S

FINAL_BATCH = ("completed", "failed", "cancelled", "expired")


def submit_batch(
    api: DispatcherAPI,
    path: str,
    regions: str | None,
    failover: str | None,
    follow: bool,
    console: Any,
) -> int:
    """Upload and start the batch; with ``follow``, wait for its end. The exit status:
    0 when every request succeeded (or, without follow, the batch passed validation)."""
    try:
        content = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as exc:
        raise CLIError(f"cannot read {path}: {exc}") from None
    file = api.upload_batch_file(Path(path).name, content)
    wanted = [r.strip() for r in regions.split(",") if r.strip()] if regions else None
    batch = api.create_batch(file["id"], wanted, failover)
    if batch["status"] == "failed":
        console.print(f"batch {batch['id']} failed validation:")
        for error in batch["errors"]["data"]:
            where = f"line {error['line']}: " if error.get("line") else ""
            console.print(f"  {where}{error['code']}: {error['message']}")
        return 1
    counts = batch["request_counts"]
    console.print(f"batch {batch['id']}: {counts['total']} requests x regions ({batch['status']})")
    if not follow:
        return 0
    while batch["status"] not in FINAL_BATCH:
        time.sleep(FOLLOW_POLL_S)
        batch = api.batch(batch["id"])
    counts = batch["request_counts"]
    console.print(
        f"batch {batch['id']} {batch['status']}: {counts['completed']} completed, "
        f"{counts['failed']} failed of {counts['total']}"
    )
    return 0 if counts["completed"] == counts["total"] else 1


def print_batch_results(api: DispatcherAPI, ident: str, fmt: str) -> None:
    if ident.startswith("batch_"):
        batch = api.batch(ident)
        if fmt != "openai-batch":
            click.echo(json.dumps(batch, indent=2))
            return
        for key in ("output_file_id", "error_file_id"):
            if batch.get(key):
                sys.stdout.write(api.file_content(batch[key]))
        return
    # every execution (the client joins the result pages)
    for line in job_lines(ident, api.results(ident)["executions"]):
        click.echo(json.dumps(line, ensure_ascii=False))


def job_lines(job_id: str, executions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A job's final executions as Batch output lines (answers first, then errors)."""
    answers, errors = [], []
    for e in executions:
        base = {
            "id": f"batch_req_{job_id[:12]}_{e['id']}",
            "custom_id": str(e["question_index"]),
            "region": e["requested_region"],
            "executed_region": e["executed_region"],
        }
        if e["state"] == "succeeded":
            usage = e.get("usage") or {}
            prompt = int(usage.get("prompt_tokens") or 0)
            completion = int(usage.get("completion_tokens") or 0)
            body = {
                "object": "chat.completion",
                "model": e["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": e["output"]},
                        "finish_reason": e.get("finish_reason") or "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt,
                    "completion_tokens": completion,
                    "total_tokens": prompt + completion,
                },
            }
            response = {"status_code": 200, "request_id": None, "body": body}
            answers.append({**base, "response": response, "error": None})
        elif e["state"] in {"dead", "cancelled"}:
            err = e.get("last_error") or {"code": "batch_cancelled", "message": "cancelled"}
            error = {"code": err.get("code"), "message": err.get("message")}
            errors.append({**base, "response": None, "error": error})
    return answers + errors
