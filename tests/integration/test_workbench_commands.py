"""The workbench's commands (jobs, cancel, retry, results --format compare|compare-csv|
jsonl, submit's page address) through click's CliRunner, against the real dispatcher
API served over HTTP from this process (memory store, werkzeug in a thread)."""

from __future__ import annotations

import csv
import io
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from werkzeug.serving import make_server

from executor_service.cli import main
from executor_service.dispatcher.api import create_dispatcher_app
from executor_service.dispatcher.api_client import DispatcherAPI
from executor_service.dispatcher.config import DispatcherSettings
from executor_service.dispatcher.rules import ClaimRequest
from executor_service.dispatcher.store.memory import MemoryStore

REGIONS_TOML = """
[regions.us]
url = "http://127.0.0.1:9"
concurrency = 10
models = ["m1"]

[regions.eu]
url = "http://127.0.0.1:9"
concurrency = 10
models = ["m1"]
"""
LONG = "This answer is long enough to be wrapped over several lines in a table cell, " * 3


class Served:
    def __init__(self, tmp: Path) -> None:
        regions = tmp / "regions.toml"
        regions.write_text(REGIONS_TOML)
        settings = DispatcherSettings.from_env(
            environ={
                "ES_REGIONS_FILE": str(regions),
                "ES_DATABASE_URL": "memory://",
                "ES_API_KEYS": "alice:key-a",
            }
        )
        self.store = MemoryStore()
        app = create_dispatcher_app({"TESTING": True}, settings=settings, store=self.store)
        self.regions = app.extensions["dispatcher"].regions
        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.api = DispatcherAPI(self.url, "key-a")
        self.env = {"ES_DISPATCHER_URL": self.url, "ES_DISPATCHER_KEY": "key-a"}

    def run(self, region: str, answer: Any) -> None:
        """Play the worker for ``region``: complete with ``answer(claim)``, or dead-letter
        when it gives None."""
        import time

        now = time.time()
        spec = self.regions[region].spec()
        for c in self.store.claim(ClaimRequest(spec, 100, now, 30, "w", 100)):
            output = answer(c)
            if output is None:
                error = {"code": "connection_error", "message": "down"}
                self.store.fail(c.execution_id, c.token, error, now, now, None)
            else:
                body = {"output": output, "finish_reason": "stop"}
                self.store.complete(c.execution_id, c.token, body, now, now)

    def cli(self, *args: str) -> Any:
        result = CliRunner().invoke(main, list(args), env=self.env)
        assert result.exit_code == 0, result.output
        return result


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    s = Served(tmp_path)
    yield s
    s.server.shutdown()
    s.thread.join(5)


def test_submit_prints_the_page_and_jobs_lists_newest_first(served: Served, tmp_path: Path) -> None:
    jobfile = tmp_path / "job.json"
    jobfile.write_text(json.dumps({"questions": ["q"], "models": ["m1"], "name": "first"}))
    out = served.cli("submit", str(jobfile)).output
    job_id = out.split()[1].rstrip(":")
    assert f"page: {served.url}/jobs/{job_id}/view" in out
    second = served.api.submit({"questions": ["q"], "models": ["m1"], "name": "second"})

    listed = json.loads(served.cli("jobs", "--json").output)["jobs"]
    assert [j["id"] for j in listed] == [second["id"], job_id]
    table = served.cli("jobs", "--name", "SEC").output
    assert second["id"] in table and job_id not in table
    assert second["id"] in served.cli("jobs", "--limit", "1", "--all").output


def test_retry_and_cancel(served: Served) -> None:
    job = served.api.submit({"questions": ["a", "b"], "models": ["m1"]})
    served.run("us", lambda c: "yes")
    served.run("eu", lambda c: None)
    out = served.cli("retry", job["id"], "--region", "eu").output
    assert f"job {job['id']}: 2 re-queued (running)" in out
    assert f"{served.url}/jobs/{job['id']}/view" in out
    out = served.cli("cancel", job["id"]).output
    assert f"job {job['id']}: 2 cancelled (cancelled)" in out
    out = served.cli("retry", job["id"], "--include-cancelled").output
    assert "2 re-queued (running)" in out


def test_results_compare_in_full_and_as_a_wide_csv(served: Served) -> None:
    job = served.api.submit({"questions": ["capital?", "essay?"], "models": ["m1"]})
    served.run("us", lambda c: "Paris" if c.question_index == 0 else LONG + "END-US")
    served.run("eu", lambda c: "Paris" if c.question_index == 0 else LONG + "END-EU")

    out = served.cli("results", job["id"], "--format", "compare").output
    assert "1 of 2 rows differ" in out and "DIFFERS" in out and "same" in out
    assert "END-US" in out and "END-EU" in out  # wrapped, never cut
    assert "…" not in out

    wide = served.cli("results", job["id"], "--format", "compare-csv").output
    rows = list(csv.DictReader(io.StringIO(wide)))
    assert [r["question"] for r in rows] == ["capital?", "essay?"]
    assert rows[1]["us"] == LONG + "END-US" and rows[1]["eu"] == LONG + "END-EU"
    assert (rows[0]["differs"], rows[1]["differs"]) == ("False", "True")

    lines = served.cli("results", job["id"], "--format", "jsonl").output.splitlines()
    assert len(lines) == 4 and json.loads(lines[0])["created_at"].endswith("Z")
    assert len(served.api.results(job["id"])["executions"]) == 4
