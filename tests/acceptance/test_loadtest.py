"""The load test as a user runs it: ``loadtests/run.py`` starts a real gunicorn executor on
loopback, runs locust headless against it, writes CSV and HTML reports, and its exit code
says whether every threshold held.

Locust runs in a subprocess (through the script), so its gevent monkeypatching and import
warnings never touch this test process.
"""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RUN = REPO / "loadtests" / "run.py"

pytestmark = pytest.mark.slow


def run_loadtest(
    report_dir: Path | None, name: str, *args: str, timeout: float = 90
) -> subprocess.CompletedProcess[str]:
    """Run loadtests/run.py as a user would, reports in ``report_dir`` (None: the default,
    loadtests/reports) under the folder ``name``."""
    where = ["--report-dir", str(report_dir)] if report_dir else []
    return subprocess.run(
        [sys.executable, str(RUN), *where, "--name", name, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def stats_rows(report_dir: Path, name: str) -> dict[str, dict[str, str]]:
    """Locust's final per-request rows (and "Aggregated"), by request name."""
    with (report_dir / name / f"{name}_stats.csv").open(newline="") as handle:
        return {row["Name"]: row for row in csv.DictReader(handle)}


@pytest.mark.timeout(120)
def test_short_load_test_passes_and_reports() -> None:
    """A 20 s run at a rate the server handles, reports where docs/loadtests.md says
    (loadtests/reports/NAME/): exit 0, no failure, the invalid requests answered 422
    without counting as failures, and the HTML report opens with the verdict."""
    name = f"test-{uuid.uuid4().hex[:8]}"
    run_dir = REPO / "loadtests" / "reports" / name
    try:
        result = run_loadtest(
            None,
            name,
            "--duration", "20s",
            "--users", "8",
            "--think-max", "0.5",
            "--bad-share", "0.1",
            "--p95-ms", "2000",
        )  # fmt: skip
        output = result.stdout + result.stderr
        assert result.returncode == 0, output
        assert result.stdout.splitlines()[-1] == "PASSED"
        # The admission limit the server really ran with, never "ES_MAX_IN_FLIGHT=0".
        assert (
            "executor: gthread 4 workers x 2 threads, ES_MAX_IN_FLIGHT=2 per worker (the default)"
            in result.stdout.splitlines()
        )
        assert "ES_MAX_IN_FLIGHT=0" not in output
        assert f"reports in {run_dir}/: {name}.html" in result.stdout
        rows = stats_rows(run_dir.parent, name)
        total = rows["Aggregated"]
        assert int(total["Request Count"]) > 0
        assert int(total["Failure Count"]) == 0
        assert int(rows["/execute"]["Request Count"]) > 0
        invalid = rows["/execute [invalid -> 422]"]
        assert int(invalid["Request Count"]) > 0
        assert int(invalid["Failure Count"]) == 0
        html = (run_dir / f"{name}.html").read_text()
        assert "/execute" in html
        banner = html[html.index('<section id="loadtest-verdict"') :]
        banner = banner[: banner.index("</section>")]
        assert "PASSED: every threshold held" in banner
        assert "sim-fast (simulated, 30..70 ms uniform latency)" in banner
        assert "&lt;= 2000 ms for every request entry" in banner
        assert "ES_MAX_IN_FLIGHT=2 per worker" in banner
        assert (run_dir / f"{name}-gunicorn.log").exists()
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


@pytest.mark.timeout(90)
def test_impossible_p95_bound_fails_the_run(tmp_path: Path) -> None:
    """A 1 ms p95 bound against a 50 ms model cannot hold: the script exits non-zero and
    says which threshold failed, and still writes its reports."""
    result = run_loadtest(
        tmp_path,
        "strict",
        "--duration", "5s",
        "--users", "4",
        "--model", "sim-50ms",
        "--bad-share", "0",
        "--p95-ms", "1",
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "THRESHOLD FAILED: p95 of POST /execute" in output
    assert "FAILED" in result.stdout
    rows = stats_rows(tmp_path, "strict")
    assert int(rows["Aggregated"]["Request Count"]) > 0
    assert int(rows["Aggregated"]["Failure Count"]) == 0
    html = (tmp_path / "strict" / "strict.html").read_text()
    banner = html[html.index('<section id="loadtest-verdict"') :]
    assert "FAILED (exit code 1)" in banner
    assert "<li>p95 of POST /execute is " in banner
    assert "sim-50ms" in banner
