"""What the dispatcher acceptance tests share: simulated executors as regions (real gunicorn),
a regions file, the real ``executor-service dispatcher`` command (API and worker processes)
in a subprocess, a fresh
PostgreSQL database, and reading the executors' access logs.

Plain functions and classes (not fixtures), so each test module builds exactly the
processes it needs and keeps the two shared cores for itself.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
from psycopg import sql
from support import REPO, Gunicorn, free_port, wait_until, write_catalog

from executor_service.dispatcher.api_client import DispatcherAPI

POSTGRES_URL = os.environ.get("ES_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
KEYS = {"alice": "key-alice", "bob": "key-bob"}
API_KEYS = ",".join(f"{tenant}:{key}" for tenant, key in KEYS.items())
FINAL = {"succeeded", "dead", "cancelled"}
# executor access log: ... "POST /execute HTTP/1.1" 200 ... request_id=<job>.<execution>.<attempt>
ACCESS_LINE = re.compile(r'"POST /execute HTTP/1\.1" (\d{3}) .* request_id=(\S+)')


def executor(
    tmp: Path, region: str, models: Mapping[str, Mapping[str, Any]], threads: int = 2
) -> Gunicorn:
    """An executor for ``region`` serving simulated ``models``, 1 worker x ``threads``, with
    its access log on (to count calls per request id). Start it with ``with``."""
    catalog = write_catalog(tmp / f"catalog-{region}-{uuid.uuid4().hex[:6]}.toml", models)
    env = {
        "ES_CATALOG": str(catalog),
        "ES_REGION": region,
        "ES_REPLICA": f"{region}-1",
        "WEB_CONCURRENCY": "1",
        "GUNICORN_THREADS": str(threads),
        "GUNICORN_ACCESSLOG": "-",
    }
    return Gunicorn(tmp, env)


def write_regions(path: Path, regions: Mapping[str, tuple[str, int, list[str]]]) -> Path:
    """``regions``: name -> (url, concurrency, models)."""
    lines = []
    for name, (url, concurrency, models) in regions.items():
        quoted = ", ".join(f'"{m}"' for m in models)
        lines += [
            f"[regions.{name}]",
            f'url = "{url}"',
            f"concurrency = {concurrency}",
            f"models = [{quoted}]",
            "timeout_s = 30",
            "",
        ]
    path.write_text("\n".join(lines))
    return path


def calls_by_request_id(*executors: Gunicorn) -> Counter[tuple[str, int]]:
    """(request_id, HTTP status) -> how many /execute calls the executors logged."""
    counts: Counter[tuple[str, int]] = Counter()
    for ex in executors:
        for match in ACCESS_LINE.finditer(ex.log()):
            counts[(match.group(2), int(match.group(1)))] += 1
    return counts


class DispatcherProcess:
    """``executor-service dispatcher`` in a subprocess, on its own port."""

    def __init__(
        self,
        tmp: Path,
        database_url: str,
        regions_file: Path,
        env: Mapping[str, str] | None = None,
        api: bool = True,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_enabled = api
        self.log_path = tmp / f"dispatcher-{self.port}.log"
        self.metrics_dir = metrics = tmp / f"dispatcher-metrics-{self.port}"
        metrics.mkdir(parents=True, exist_ok=True)
        self.env = {
            **os.environ,
            "ES_DATABASE_URL": database_url,
            "ES_REGIONS_FILE": str(regions_file),
            "ES_API_KEYS": API_KEYS,
            "ES_LOG_LEVEL": "warning",
            "ES_CLAIM_POLL_S": "0.05",
            "ES_BACKOFF_BASE_S": "0.1",
            "ES_BACKOFF_MAX_S": "1",
            "ES_SHUTDOWN_GRACE_S": "10",
            "PROMETHEUS_MULTIPROC_DIR": str(metrics),
            **(env or {}),
        }
        if not api and not (env and "ES_LOG_LEVEL" in env):
            self.env["ES_LOG_LEVEL"] = "info"  # start() waits for "dispatcher started"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> DispatcherProcess:
        argv = [
            sys.executable,
            "-m",
            "executor_service.cli",
            "dispatcher",
            "--port",
            str(self.port),
        ]
        if not self.api_enabled:
            argv.append("--no-api")
        with self.log_path.open("ab") as log:
            # A session of its own: kill() takes the API and worker children with it.
            self.proc = subprocess.Popen(
                argv,
                cwd=REPO,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            if self.api_enabled:
                wait_until(self._healthy, 60, what=f"dispatcher API on {self.url}")
            else:
                # No API to ask: the worker is up once it has logged its start (the log
                # level is info for this), so a job submitted next finds it claiming.
                wait_until(self._worker_started, 60, what="dispatcher worker start")
        except TimeoutError:
            self.kill()
            raise TimeoutError(f"dispatcher did not start:\n{self.log()}") from None
        return self

    def _worker_started(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"dispatcher exited with {self.proc.returncode}:\n{self.log()}")
        return "dispatcher started" in self.log()

    def _healthy(self) -> bool:
        import requests

        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"dispatcher exited with {self.proc.returncode}:\n{self.log()}")
        return requests.get(self.url + "/health", timeout=2).status_code == 200

    def api(self, tenant: str = "alice") -> DispatcherAPI:
        return DispatcherAPI(self.url, KEYS[tenant])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def calls_made(self) -> float:
        """Executor calls this process made, from its Prometheus files (dispatcher_calls_total)."""
        from prometheus_client import CollectorRegistry, multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(self.metrics_dir))
        return sum(
            sample.value
            for metric in registry.collect()
            if metric.name == "dispatcher_calls"
            for sample in metric.samples
            if sample.name == "dispatcher_calls_total"
        )

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM and wait: the graceful path."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._kill_group()
            raise

    def kill(self) -> None:
        """SIGKILL of the whole process group: a crash of the host (or container) running
        ``executor-service dispatcher`` and its API and worker children."""
        if self.proc is not None and self.proc.poll() is None:
            self._kill_group()

    def _kill_group(self) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def __enter__(self) -> DispatcherProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_finished(api: DispatcherAPI, job_id: str, timeout: float = 60.0) -> dict[str, Any]:
    """Wait until every execution of the job is final; return the job."""
    return wait_until(  # type: ignore[no-any-return]
        lambda: (job := api.job(job_id))["state"] in {"finished", "cancelled"} and job,
        timeout,
        interval=0.1,
        what=f"job {job_id} to finish",
    )


@contextmanager
def postgres_database() -> Iterator[str]:
    """A new, empty PostgreSQL database for one test (the store migrates it), dropped after."""
    name = f"es_disp_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield urlsplit(POSTGRES_URL)._replace(path="/" + name).geturl()
    finally:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def span(executions: list[dict[str, Any]]) -> tuple[float, float]:
    """(first attempt start, last attempt end) over the executions' attempt logs."""
    attempts = [a for e in executions for a in e["attempt_log"]]
    return min(a["started_at"] for a in attempts), max(a["finished_at"] for a in attempts)
