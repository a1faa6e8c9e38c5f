"""Start and stop a real gunicorn executor on a free loopback port, for load tests and benches.

Used by ``loadtests/run.py``, ``capacity.py``, ``soak.py`` and the scripts in ``bench/``.
It runs exactly what production runs (``gunicorn -c python:executor_service.gunicorn_config``),
configured only through the environment variables that config reads, with the
simulated catalog of this folder, so a number measured here is a number about the
deployed server and not about a test double.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import psutil
import requests

REPO = Path(__file__).resolve().parents[1]
LOADTESTS = REPO / "loadtests"
CATALOG = LOADTESTS / "catalog-simulated.toml"
REPORTS = LOADTESTS / "reports"
GUNICORN_CONFIG = "python:executor_service.gunicorn_config"
EXECUTOR_APP = "executor_service:create_app()"
# Log lines that mean the server failed, whatever the clients saw.
SERVER_TROUBLE = re.compile(r"Traceback \(most recent call last\)|WORKER TIMEOUT|\[CRITICAL\]")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(
    predicate: Callable[[], Any], timeout: float, interval: float = 0.1, what: str = ""
) -> Any:
    """Poll ``predicate`` until it returns something truthy; TimeoutError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except Exception as exc:  # the server may not listen yet
            last_exc = exc
        else:
            if value:
                return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}: {last_exc}")


class LocalExecutor:
    """A gunicorn master serving ``app`` on 127.0.0.1, with an API key of its own.

    ``env`` is applied last, so any gunicorn or ``ES_*`` variable can be overridden.
    ``max_requests=0`` turns gunicorn's worker recycling off (benchmarks and the soak
    want the same worker processes from start to end); ``None`` keeps the default.
    """

    def __init__(
        self,
        *,
        worker_class: str = "gthread",
        workers: int = 4,
        threads: int = 2,
        max_in_flight: int | None = None,
        catalog: Path = CATALOG,
        app: str = EXECUTOR_APP,
        api_key: str | None = None,
        log_level: str = "warning",
        max_requests: int | None = None,
        log_path: Path | None = None,
        env: Mapping[str, str] | None = None,
        startup_timeout: float = 60.0,
        ready_path: str = "/ready",
        tree: Path = REPO,
    ) -> None:
        self.port = free_port()
        self.tree = tree  # the checkout whose code runs (another commit's, to compare)
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key if api_key is not None else "lt-" + secrets.token_hex(12)
        self.app = app
        self.ready_path = ready_path
        self.startup_timeout = startup_timeout
        self._metrics_dir = tempfile.mkdtemp(prefix="loadtest-metrics-")
        self._own_log = log_path is None  # a temporary log is removed by stop()
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix=f"gunicorn-{self.port}-", suffix=".log")
            os.close(fd)
            log_path = Path(name)
        self.log_path = log_path
        self.env = {
            **os.environ,
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "WEB_CONCURRENCY": str(workers),
            "GUNICORN_THREADS": str(threads),
            "GUNICORN_WORKER_CLASS": worker_class,
            "GUNICORN_ACCESSLOG": "",
            # A load test should stop in seconds, not wait the production 30 s.
            "GUNICORN_GRACEFUL_TIMEOUT": "10",
            "PROMETHEUS_MULTIPROC_DIR": self._metrics_dir,
            "ES_CATALOG": str(catalog),
            "ES_API_KEYS": f"loadtest:{self.api_key}" if self.api_key else "",
            "ES_API_KEYS_FILE": "",
            "ES_LOG_LEVEL": log_level,
            "ES_REGION": "loadtest-local",
        }
        # Unset means the server's default (gunicorn_config): never the shell's value.
        self.env.pop("ES_MAX_IN_FLIGHT", None)
        if max_in_flight:
            self.env["ES_MAX_IN_FLIGHT"] = str(max_in_flight)
        if max_requests is not None:
            self.env["GUNICORN_MAX_REQUESTS"] = str(max_requests)
        self.env.update(env or {})
        self._server = (
            f"{worker_class} {workers} workers x {threads} threads"
            if worker_class == "gthread"
            else f"gevent {workers} workers"
        )
        # The admission limit per worker: as configured, then as the server reports it.
        self.max_in_flight: int | None = int(self.env.get("ES_MAX_IN_FLIGHT") or 0) or None
        self._limit_is_default = self.max_in_flight is None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def description(self) -> str:
        """What runs, e.g. ``gthread 4 workers x 2 threads, ES_MAX_IN_FLIGHT=2 per worker
        (the default)``; before start() an unset limit reads "the default"."""
        if self.max_in_flight is None:
            return f"{self._server}, ES_MAX_IN_FLIGHT: the default"
        default = " (the default)" if self._limit_is_default else ""
        return f"{self._server}, ES_MAX_IN_FLIGHT={self.max_in_flight} per worker{default}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def start(self) -> LocalExecutor:
        """Start gunicorn and return once every worker answers ``ready_path``."""
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "-c", GUNICORN_CONFIG, self.app],
                cwd=self.tree,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        expected = int(self.env["WEB_CONCURRENCY"])
        try:
            wait_until(self._ready, self.startup_timeout, what=f"gunicorn on {self.url}")
            # /ready is answered by whichever worker accepts; wait until all are forked.
            wait_until(
                lambda: len(self.worker_pids()) >= expected, self.startup_timeout, what="workers"
            )
        except (TimeoutError, RuntimeError):
            self.stop()
            raise RuntimeError(f"gunicorn did not start; log:\n{self.log()[-4000:]}") from None
        if self.max_in_flight is None and self.app == EXECUTOR_APP:
            # The limit the workers really use (gunicorn_config derives the default).
            limit = self.metric("executor_admission_limit")
            self.max_in_flight = int(limit) if limit else None
        return self

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"gunicorn exited with {self.proc.returncode}")
        return requests.get(self.url + self.ready_path, timeout=2).status_code == 200

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def trouble(self) -> list[str]:
        """Log lines showing a traceback, a worker timeout (a hang) or a critical error."""
        return [line for line in self.log().splitlines() if SERVER_TROUBLE.search(line)]

    def worker_pids(self) -> list[int]:
        """PIDs of the gunicorn workers (the master's children)."""
        if self.proc is None or self.proc.poll() is not None:
            return []
        try:
            return sorted(c.pid for c in psutil.Process(self.proc.pid).children())
        except psutil.NoSuchProcess:
            return []

    def worker_rss_mb(self) -> dict[int, float]:
        """Resident memory of every worker, in MiB, by PID."""
        rss: dict[int, float] = {}
        for pid in self.worker_pids():
            try:
                rss[pid] = psutil.Process(pid).memory_info().rss / 2**20
            except psutil.NoSuchProcess:
                continue
        return rss

    def cpu_seconds(self) -> float:
        """CPU time (user + system) used so far by the master and its live workers."""
        if self.proc is None:
            return 0.0
        total = 0.0
        try:
            master = psutil.Process(self.proc.pid)
            for proc in [master, *master.children()]:
                times = proc.cpu_times()
                total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
        return total

    def metric(self, name: str) -> float:
        """The sum of every sample of ``name`` on /metrics (all workers, all labels)."""
        text = requests.get(self.url + "/metrics", headers=self.headers, timeout=10).text
        return metric_sum(text, name)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM the master (graceful: in-flight calls finish), SIGKILL after ``timeout``;
        remove the metrics directory and a temporary log (read ``trouble()`` before)."""
        code: int | None = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                code = self.proc.wait(10)
        elif self.proc is not None:
            code = self.proc.returncode
        shutil.rmtree(self._metrics_dir, ignore_errors=True)
        if self._own_log:
            self.log_path.unlink(missing_ok=True)
        return code

    def __enter__(self) -> LocalExecutor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class LocalDispatcher:
    """``executor-service dispatcher`` (API + region workers, SQLite in a temporary
    directory) on a free loopback port, fanning out to ``executor`` as two regions.

    Both regions point at the same local executor and serve every model of its
    catalog; their slots add up to ``slots`` so the dispatcher never sends the
    executor more calls than it admits.
    """

    def __init__(
        self,
        executor: LocalExecutor,
        *,
        slots: int = 8,
        catalog: Path = CATALOG,
        log_path: Path | None = None,
        startup_timeout: float = 60.0,
    ) -> None:
        self.executor = executor
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = "ltd-" + secrets.token_hex(12)
        self.startup_timeout = startup_timeout
        self._dir = tempfile.mkdtemp(prefix="loadtest-dispatcher-")
        models = sorted(tomllib.loads(catalog.read_text())["models"])
        regions = Path(self._dir) / "regions.toml"
        lines = []
        for name, concurrency in (("local-a", slots - slots // 2), ("local-b", slots // 2)):
            lines += [
                f"[regions.{name}]",
                f'url = "{executor.url}"',
                f"concurrency = {max(1, concurrency)}",
                "models = [" + ", ".join(f'"{m}"' for m in models) + "]",
                'api_key_env = "LOADTEST_EXECUTOR_KEY"',
                "",
            ]
        regions.write_text("\n".join(lines))
        self.regions = ["local-a", "local-b"]
        self.log_path = log_path or Path(self._dir) / "dispatcher.log"
        self.env = {
            **{k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"},
            "ES_REGIONS_FILE": str(regions),
            "ES_DATABASE_URL": f"sqlite:///{self._dir}/dispatcher.db",
            "ES_API_KEYS": f"loadtest:{self.api_key}",
            "ES_API_KEYS_FILE": "",
            "LOADTEST_EXECUTOR_KEY": executor.api_key,
            "ES_LOG_LEVEL": "warning",
            "GUNICORN_ACCESSLOG": "",
        }
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def start(self) -> LocalDispatcher:
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "executor_service.cli", "dispatcher",
                 "--host", "127.0.0.1", "--port", str(self.port)],
                cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"the dispatcher exited with {self.proc.returncode}")
            return requests.get(self.url + "/health", timeout=2).status_code == 200

        try:
            wait_until(up, self.startup_timeout, what=f"dispatcher on {self.url}")
        except (TimeoutError, RuntimeError):
            self.stop()
            raise RuntimeError(f"dispatcher did not start; log:\n{self.log()[-4000:]}") from None
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def trouble(self) -> list[str]:
        return [line for line in self.log().splitlines() if SERVER_TROUBLE.search(line)]

    def stop(self, timeout: float = 60.0) -> int | None:
        code: int | None = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                code = self.proc.wait(10)
        shutil.rmtree(self._dir, ignore_errors=True)
        return code

    def __enter__(self) -> LocalDispatcher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def metric_sum(text: str, name: str) -> float:
    """Add up every sample of metric ``name`` in a Prometheus text exposition."""
    total = 0.0
    pattern = re.compile(rf"^{re.escape(name)}(?:\{{[^}}]*\}})?\s+(\S+)$")
    for line in text.splitlines():
        match = pattern.match(line)
        if match:
            total += float(match.group(1))
    return total


def parse_duration(raw: str | float) -> float:
    """Seconds from ``90``, ``90s``, ``2m`` or ``1h`` (locust's --run-time spelling)."""
    if isinstance(raw, int | float):
        return float(raw)
    text = raw.strip().lower()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smh]?)", text)
    if not match:
        raise ValueError(f"not a duration: {raw!r} (expected e.g. 30, 30s, 2m)")
    value = float(match.group(1))
    return value * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    return {
        "cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": sys.version.split()[0],
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


class CpuMeter:
    """Cores used by the server, and by the whole machine, between ``start()`` and ``stop()``.

    On a shared machine "machine minus server minus load generator" is the load of
    everything else: a reader needs it to tell a slow server from a busy machine.
    """

    def __init__(self, server: LocalExecutor) -> None:
        self.server = server
        self._wall = self._server = self._busy = 0.0
        self.result: dict[str, float] = {}

    @staticmethod
    def _machine_busy() -> float:
        times = psutil.cpu_times()
        return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))

    def start(self) -> CpuMeter:
        self._wall, self._server = time.monotonic(), self.server.cpu_seconds()
        self._busy = self._machine_busy()
        return self

    def stop(self) -> dict[str, float]:
        wall = time.monotonic() - self._wall
        self.result = {
            "server_cores": round((self.server.cpu_seconds() - self._server) / wall, 2),
            "machine_cores": round((self._machine_busy() - self._busy) / wall, 2),
            "wall_s": round(wall, 1),
        }
        return self.result
