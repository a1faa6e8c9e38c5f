"""The load test as a user runs it: ``loadtests/run.py`` starts a real gunicorn executor on
loopback, runs locust headless against it, writes CSV and HTML reports, and its exit code
says whether every threshold held.

Locust runs in a subprocess (through the script), so its gevent monkeypatching and import
warnings never touch this test process.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RUN = REPO / "loadtests" / "run.py"

pytestmark = pytest.mark.slow


def run_loadtest(
    report_dir: Path, name: str, *args: str, timeout: float = 90
) -> subprocess.CompletedProcess[str]:
    """Run loadtests/run.py as a user would, reports in ``report_dir`` named ``name``."""
    return subprocess.run(
        [sys.executable, str(RUN), "--report-dir", str(report_dir), "--name", name, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def stats_rows(report_dir: Path, name: str) -> dict[str, dict[str, str]]:
    """Locust's final per-request rows (and "Aggregated"), by request name."""
    with (report_dir / f"{name}_stats.csv").open(newline="") as handle:
        return {row["Name"]: row for row in csv.DictReader(handle)}


@pytest.mark.timeout(120)
def test_short_load_test_passes_and_reports(tmp_path: Path) -> None:
    """A 20 s run at a rate the server handles: exit 0, reports written, no failure,
    and the invalid requests were answered 422 without counting as failures."""
    result = run_loadtest(
        tmp_path,
        "short",
        "--duration", "20s",
        "--users", "8",
        "--think-max", "0.5",
        "--bad-share", "0.1",
        "--p95-ms", "2000",
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "PASSED" in result.stdout
    rows = stats_rows(tmp_path, "short")
    total = rows["Aggregated"]
    assert int(total["Request Count"]) > 0
    assert int(total["Failure Count"]) == 0
    assert int(rows["/execute"]["Request Count"]) > 0
    invalid = rows["/execute [invalid -> 422]"]
    assert int(invalid["Request Count"]) > 0
    assert int(invalid["Failure Count"]) == 0
    html = (tmp_path / "short.html").read_text()
    assert "/execute" in html
    assert (tmp_path / "short-gunicorn.log").exists()


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
