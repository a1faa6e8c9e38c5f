"""The HTTP client of the dispatcher API, for the CLI (submit, status, results), the demo,
benchmarks and tests; and reading a job file. Errors a user can act on are CLIError."""

from __future__ import annotations

import json
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import requests

from ..exceptions import ExecutorServiceError
from .config import ClientSettings


class CLIError(ExecutorServiceError):
    """A command failed in a way the user can act on; the message says how."""


class DispatcherAPI:
    """A small client of the dispatcher API, for the CLI and the demo."""

    def __init__(self, url: str, key: str = "", timeout_s: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.session = requests.Session()
        if key:
            self.session.headers["Authorization"] = f"Bearer {key}"

    def _request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        try:
            response = self.session.request(
                method, self.url + path, timeout=self.timeout_s, **kwargs
            )
        except requests.RequestException as exc:
            raise CLIError(
                f"cannot reach the dispatcher at {self.url} (ES_DISPATCHER_URL): {exc}"
            ) from None
        if response.status_code >= 400:
            try:
                err = response.json()["error"]
                message = f"{err['code']}: {err['message']}"
                if err.get("details"):
                    message += f" {json.dumps(err['details'])}"
            except (ValueError, KeyError, TypeError):
                message = f"HTTP {response.status_code}: {response.text[:300]}"
            raise CLIError(message)
        return response

    def submit(self, job: Mapping[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._request("POST", "/jobs", json=job, headers=headers).json()

    def job(self, job_id: str) -> dict[str, Any]:
        return self._request("GET", f"/jobs/{job_id}").json()

    def results(self, job_id: str) -> dict[str, Any]:
        """Every execution of the job: the pages of GET /jobs/<id>/results joined."""
        page = self._request("GET", f"/jobs/{job_id}/results").json()
        executions = list(page["executions"])
        while page.get("next_cursor"):
            params = {"cursor": page["next_cursor"]}
            page = self._request("GET", f"/jobs/{job_id}/results", params=params).json()
            executions += page["executions"]
        return {**page, "executions": executions, "next_cursor": None}

    def results_csv(self, job_id: str) -> str:
        return self._request("GET", f"/jobs/{job_id}/results", params={"format": "csv"}).text

    def results_jsonl(self, job_id: str) -> str:
        return self._request("GET", f"/jobs/{job_id}/results", params={"format": "jsonl"}).text

    def compare(self, job_id: str) -> dict[str, Any]:
        return self._request("GET", f"/jobs/{job_id}/compare").json()

    def jobs(
        self,
        state: str | None = None,
        name: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> dict[str, Any]:
        """One page of the tenant's jobs, newest first (``next_cursor`` for the next)."""
        params = {"state": state, "name": name, "limit": limit, "cursor": cursor}
        found = {k: v for k, v in params.items() if v is not None}
        return self._request("GET", "/jobs", params=found).json()

    def retry(
        self,
        job_id: str,
        regions: list[str] | None = None,
        models: list[str] | None = None,
        include_cancelled: bool = False,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"include_cancelled": include_cancelled}
        if regions:
            body["regions"] = regions
        if models:
            body["models"] = models
        return self._request("POST", f"/jobs/{job_id}/retry", json=body).json()

    def page_url(self, job_id: str) -> str:
        """The job's live page in a browser (the key is typed on the page, not put here)."""
        return f"{self.url}/jobs/{job_id}/view"

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._request("POST", f"/jobs/{job_id}/cancel").json()

    def queue(self) -> dict[str, Any]:
        return self._request("GET", "/queue").json()

    # -- the OpenAI Batch API (dispatcher/openai_batch_api.py) --------------------
    def upload_batch_file(self, name: str, content: bytes) -> dict[str, Any]:
        files = {"file": (name, content, "application/jsonl")}
        return self._request("POST", "/v1/files", files=files, data={"purpose": "batch"}).json()

    def create_batch(
        self, file_id: str, regions: list[str] | None = None, failover: str | None = None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "input_file_id": file_id,
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        }
        if regions:
            body["regions"] = regions
        if failover:
            body["failover"] = failover
        return self._request("POST", "/v1/batches", json=body).json()

    def batch(self, batch_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/batches/{batch_id}").json()

    def file_content(self, file_id: str) -> str:
        return self._request("GET", f"/v1/files/{file_id}/content").text


def api_from_env() -> DispatcherAPI:
    """A client of the API at ES_DISPATCHER_URL with the key in ES_DISPATCHER_KEY."""
    settings = ClientSettings.from_env()
    return DispatcherAPI(settings.dispatcher_url, settings.dispatcher_key)


def load_job_file(path: str) -> dict[str, Any]:
    """A job request from a JSON or TOML file (by extension; ``-`` reads JSON from stdin)."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as exc:
        raise CLIError(f"cannot read {path}: {exc}") from None
    try:
        data = tomllib.loads(text) if path.endswith(".toml") else json.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        kind = "TOML" if path.endswith(".toml") else "JSON"
        raise CLIError(f"{path}: not valid {kind}: {exc}") from None
    if not isinstance(data, dict):
        raise CLIError(f"{path}: a job is an object with questions and models")
    return data
