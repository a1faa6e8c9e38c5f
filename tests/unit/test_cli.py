"""The ``executor-service`` commands through click's CliRunner, where no real process is
needed: help, exit codes and messages, settings validated before the store is touched,
and the client commands against a fake API (the real ones run in tests/acceptance)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from executor_service.cli import main
from executor_service.dispatcher import commands
from executor_service.dispatcher.api_client import CLIError
from executor_service.exceptions import ExecutorServiceError

JOB = {
    "id": "j1",
    "state": "finished",
    "total": 2,
    "states": {"succeeded": 2},
    "counts": {"us": {"succeeded": 2}},
    "progress": {
        "done": 2,
        "total": 2,
        "fraction": 1.0,
        "succeeded": 2,
        "dead": 0,
        "cancelled": 0,
        "in_progress": 0,
    },
    "eta_s": None,
}
EXECUTION = {
    "question_index": 0,
    "question": "q?",
    "model": "m",
    "requested_region": "us",
    "executed_region": "us",
    "state": "succeeded",
    "attempts": 1,
    "output": "an answer",
    "last_error": None,
}


class FakeAPI:
    def __init__(self, error: str | None = None) -> None:
        self.error = error
        self.submitted: list[tuple[dict[str, Any], str | None]] = []

    def _check(self) -> None:
        if self.error:
            raise CLIError(self.error)

    def submit(self, job: dict[str, Any], key: str | None = None) -> dict[str, Any]:
        self._check()
        self.submitted.append((job, key))
        return {**JOB, "state": "running"}

    def job(self, job_id: str) -> dict[str, Any]:
        self._check()
        return {**JOB, "id": job_id}

    def results(self, job_id: str) -> dict[str, Any]:
        self._check()
        return {"job_id": job_id, "state": "finished", "executions": [EXECUTION]}

    def results_csv(self, job_id: str) -> str:
        self._check()
        return "execution_id,output\n1,an answer\n"

    def page_url(self, job_id: str) -> str:
        return f"http://dispatcher/jobs/{job_id}/view"


@pytest.fixture
def fake_api(monkeypatch: pytest.MonkeyPatch) -> FakeAPI:
    api = FakeAPI()
    monkeypatch.setattr(commands, "api_from_env", lambda: api)
    return api


def test_help_lists_every_command() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for name in ("serve", "dispatcher", "submit", "status", "results", "demo"):
        assert name in result.output
    result = CliRunner().invoke(main, ["dispatcher", "--help"])
    assert result.exit_code == 0
    for name in ("api", "worker", "run", "--no-api", "--port"):
        assert name in result.output


@pytest.mark.parametrize(
    "command", [["dispatcher", "worker"], ["dispatcher"], ["dispatcher", "api"]]
)
def test_a_bad_setting_exits_2_naming_it_before_the_store_is_touched(
    tmp_path: Path, command: list[str]
) -> None:
    db = tmp_path / "never.db"
    env = {"ES_DATABASE_URL": f"sqlite:///{db}", "ES_LEASE_S": "-1"}
    result = CliRunner().invoke(main, command, env=env)
    assert result.exit_code == 2
    assert "configuration error: ES_LEASE_S='-1' is not valid" in result.output
    assert not db.exists()


def test_a_cross_field_check_names_both_variables(tmp_path: Path) -> None:
    db = tmp_path / "never.db"
    env = {"ES_DATABASE_URL": f"sqlite:///{db}", "ES_BACKOFF_BASE_S": "90"}
    result = CliRunner().invoke(main, ["dispatcher", "worker"], env=env)
    assert result.exit_code == 2
    assert "ES_BACKOFF_BASE_S=90" in result.output and "ES_BACKOFF_MAX_S=60" in result.output
    assert not db.exists()


def test_a_missing_regions_file_is_a_configuration_error(tmp_path: Path) -> None:
    env = {"ES_DATABASE_URL": f"sqlite:///{tmp_path / 'd.db'}", "ES_REGIONS_FILE": ""}
    result = CliRunner().invoke(main, ["dispatcher", "worker"], env=env)
    assert result.exit_code == 2 and "ES_REGIONS_FILE" in result.output


def test_submit_status_and_results(fake_api: FakeAPI, tmp_path: Path) -> None:
    jobfile = tmp_path / "job.toml"
    jobfile.write_text('questions = ["q?"]\nmodels = ["m"]\n')
    runner = CliRunner()

    submitted = runner.invoke(main, ["submit", str(jobfile), "--idempotency-key", "k"])
    assert submitted.exit_code == 0 and "job j1: 2 executions (running)" in submitted.output
    assert "page: http://dispatcher/jobs/j1/view" in submitted.output
    assert fake_api.submitted == [({"questions": ["q?"], "models": ["m"]}, "k")]

    status = runner.invoke(main, ["status", "j1", "--json"])
    assert status.exit_code == 0 and json.loads(status.output)["id"] == "j1"
    table = runner.invoke(main, ["status", "j1"])
    assert table.exit_code == 0 and "2/2 succeeded (100%), 0 dead" in table.output

    as_csv = runner.invoke(main, ["results", "j1", "--format", "csv"])
    assert as_csv.exit_code == 0 and as_csv.output.startswith("execution_id,output")
    as_json = runner.invoke(main, ["results", "j1", "--format", "json"])
    assert json.loads(as_json.output)["executions"][0]["output"] == "an answer"
    as_table = runner.invoke(main, ["results", "j1"])
    assert as_table.exit_code == 0 and "an answer" in as_table.output


def test_an_api_error_exits_1_with_its_message(fake_api: FakeAPI) -> None:
    fake_api.error = "not_found: No such resource."
    result = CliRunner().invoke(main, ["status", "nope"])
    assert result.exit_code == 1
    assert "executor-service status: not_found: No such resource." in result.output


def test_an_unreadable_job_file_exits_1(fake_api: FakeAPI, tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    result = CliRunner().invoke(main, ["submit", str(bad)])
    assert result.exit_code == 1 and "not valid JSON" in result.output
    assert fake_api.submitted == []


def test_the_errors_share_one_base() -> None:
    from executor_service.config import ConfigError
    from executor_service.dispatcher.store.base import StoreError
    from executor_service.errors import APIError
    from executor_service.executor.providers.base import ProviderFailure, ProviderTimeout

    for cls in (APIError, ConfigError, StoreError, ProviderFailure, ProviderTimeout, CLIError):
        assert issubclass(cls, ExecutorServiceError)
    assert str(StoreError()) == "The store failed."


def test_no_module_uses_ctypes_or_grows_past_500_lines() -> None:
    package = Path(__file__).resolve().parents[2] / "executor_service"
    for path in package.rglob("*.py"):
        text = path.read_text()
        assert "ctypes" not in text, path
        assert text.count("\n") <= 500, path
