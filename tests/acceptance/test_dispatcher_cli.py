"""The dispatcher commands as a user runs them: ``submit --follow``, ``status``, ``results``
against a running ``executor-service dispatcher``; SIGTERM mid-job; and ``demo --simulated``."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from dispatcher_harness import KEYS, DispatcherProcess, executor, wait_finished, write_regions
from support import REPO, Gunicorn, free_port, wait_until

from executor_service.dispatcher.store import open_store

pytestmark = pytest.mark.slow

JOB_TOML = """
questions = ["What is 2 + 2?", "Name a colour."]
models = ["sim"]
failover = "none"
[params]
max_tokens = 16
"""


def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "executor_service.cli", *args],
        cwd=REPO,
        env={**os.environ, "COLUMNS": "200", **(env or {})},  # rich wraps at 80 when piped
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def regions(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    tmp = tmp_path_factory.mktemp("cli")
    model = {"sim": {"provider": "simulated", "latency_s": 0.05}}
    with executor(tmp, "r1", model) as e1, executor(tmp, "r2", model) as e2:
        yield (
            tmp,
            write_regions(
                tmp / "regions.toml", {"r1": (e1.url, 2, ["sim"]), "r2": (e2.url, 2, ["sim"])}
            ),
        )


def test_submit_follow_status_results(regions: tuple[Path, Path], tmp_path: Path) -> None:
    _, regions_file = regions
    with DispatcherProcess(tmp_path, f"sqlite:///{tmp_path / 'd.db'}", regions_file) as d:
        env = {"ES_DISPATCHER_URL": d.url, "ES_DISPATCHER_KEY": KEYS["alice"]}
        jobfile = tmp_path / "job.toml"
        jobfile.write_text(JOB_TOML)
        submitted = cli("submit", str(jobfile), "--follow", env=env)
        assert submitted.returncode == 0, submitted.stderr
        match = re.search(r"job ([0-9a-f]{32}): 4 executions", submitted.stdout)
        assert match, submitted.stdout
        job_id = match.group(1)
        assert "r1" in submitted.stdout and "r2" in submitted.stdout
        assert f"page: {d.url}/jobs/{job_id}/view" in submitted.stdout

        status = cli("status", job_id, "--json", env=env)
        assert status.returncode == 0
        job = json.loads(status.stdout)
        assert job["state"] == "finished" and job["states"] == {"succeeded": 4}
        table = cli("status", job_id, env=env)
        assert "4/4 succeeded (100%), 0 dead" in table.stdout

        as_csv = cli("results", job_id, "--format", "csv", env=env)
        rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
        assert len(rows) == 4 and {r["state"] for r in rows} == {"succeeded"}
        assert {r["executed_region"] for r in rows} == {"r1", "r2"}
        as_json = json.loads(cli("results", job_id, "--format", "json", env=env).stdout)
        assert as_json["executions"][0]["output"].startswith("simulated answer to:")
        as_table = cli("results", job_id, env=env)
        assert as_table.returncode == 0 and "Name a colour." in as_table.stdout
        compared = cli("results", job_id, "--format", "compare", env=env)
        assert compared.returncode == 0 and "0 of 2 rows differ" in compared.stdout
        listed = cli("jobs", env=env)
        assert listed.returncode == 0 and job_id in listed.stdout

        # idempotent resubmission through the CLI gives the same job
        first = cli("submit", str(jobfile), "--idempotency-key", "abc", env=env)
        again = cli("submit", str(jobfile), "--idempotency-key", "abc", env=env)
        assert first.stdout.split(":")[0] == again.stdout.split(":")[0]

        missing = cli("status", "0" * 32, env=env)
        assert missing.returncode == 1 and "not_found" in missing.stderr
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({"questions": [], "models": ["sim"]}))
        refused = cli("submit", str(bad), env=env)
        assert refused.returncode == 1 and "validation_error" in refused.stderr
    down = cli("status", job_id, env={"ES_DISPATCHER_URL": f"http://127.0.0.1:{free_port()}"})
    assert down.returncode == 1 and "cannot reach the dispatcher" in down.stderr


def test_sigterm_keeps_the_seats_of_calls_in_flight_and_a_restart_finishes(
    tmp_path: Path,
) -> None:
    slow = {"sim": {"provider": "simulated", "latency_s": 2.0}}
    with Gunicorn(
        tmp_path,
        {
            "ES_CATALOG": str(_catalog(tmp_path, slow)),
            "WEB_CONCURRENCY": "1",
            "GUNICORN_THREADS": "2",
        },
    ) as ex:
        regions_file = write_regions(tmp_path / "regions.toml", {"r1": (ex.url, 2, ["sim"])})
        # calls of at most 5 s: their seats are free again 10 s after they were sent
        regions_file.write_text(regions_file.read_text().replace("timeout_s = 30", "timeout_s = 5"))
        url = f"sqlite:///{tmp_path / 'd.db'}"
        env = {"ES_SHUTDOWN_GRACE_S": "0.5", "ES_LEASE_S": "3"}
        first = DispatcherProcess(tmp_path, url, regions_file, env).start()
        api = first.api()
        job = api.submit({"questions": ["a", "b", "c"], "models": ["sim"]})
        wait_until(lambda: api.job(job["id"])["states"].get("leased") == 2, 10, what="2 leased")
        assert first.stop(timeout=30) == 0
        store = open_store(url)
        try:
            after_stop = store.executions(job["id"])
        finally:
            store.close()
        # not released: the two calls may still run at the executor, so their seats stay
        # taken (leased) until their deadline has passed; the third waits
        assert sorted((e.state.value, e.attempts) for e in after_stop) == [
            ("leased", 1),
            ("leased", 1),
            ("queued", 0),
        ]
        with DispatcherProcess(tmp_path, url, regions_file, {"ES_LEASE_S": "3"}) as second:
            api = second.api()
            wait_finished(api, job["id"], timeout=60)
            executions = api.results(job["id"])["executions"]
    assert {e["state"] for e in executions} == {"succeeded"}


def _catalog(tmp: Path, models: dict[str, dict[str, object]]) -> Path:
    from support import write_catalog

    return write_catalog(tmp / "catalog.toml", models)


def test_demo_simulated_runs_end_to_end(tmp_path: Path) -> None:
    store = str(tmp_path / "demo")  # not the user's state directory
    result = cli("demo", "--simulated", "--model", "sim", "--store-dir", store, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for region in ("us-east", "eu-west", "asia-pacific"):
        assert f"({region}) simulated" in out.replace("\n", " ") or region in out
    assert "12/12 answered" in out
    assert "shutting down" in out
