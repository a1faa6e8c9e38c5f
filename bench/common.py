"""What the dispatcher benchmarks share: real executors (gunicorn, simulated models), a
regions file, the real ``executor-service dispatcher`` command, a throw-away store
(SQLite file or a fresh PostgreSQL database), and reading processes' memory and CPU.

Everything runs on 127.0.0.1 with a clean environment: no ``ES_*`` setting of the
calling shell leaks into the processes started here, so the dispatcher runs with
the package defaults unless a script overrides one on purpose (and prints it).
Each process's output goes to a log file in the run's temporary directory.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

sys.path.insert(0, str(REPO / "loadtests"))

from localserver import free_port, wait_until  # noqa: E402

from executor_service.dispatcher.api_client import DispatcherAPI  # noqa: E402

EXECUTOR_APP = "executor_service:create_app()"
EXECUTOR_GUNICORN_CONFIG = "python:executor_service.gunicorn_config"
POSTGRES_URL = os.environ.get("BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
# Tenants of the dispatcher API (ES_API_KEYS entries tenant:key).
KEYS = {"tenant-a": "bench-key-a", "tenant-b": "bench-key-b"}
# A process that is not up after this long has failed (imports take ~1-3 s on 2 cores).
START_TIMEOUT_S = 60.0


# -- the machine ------------------------------------------------------------------
def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


def machine() -> str:
    """One line: cores, memory, Python, load average (read it before trusting a figure)."""
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    load = ", ".join(f"{x:.2f}" for x in load_average())
    return (
        f"{os.cpu_count()} cores, {mem_gb:.1f} GiB RAM, Python {platform.python_version()}, "
        f"load average {load}"
    )


def noisy(threshold: float = 1.0) -> str:
    """A warning when the 1-minute load average says other work shares the cores."""
    one = load_average()[0]
    if one > threshold:
        return f"NOISY: 1-min load average {one:.2f} before this run (other processes busy)"
    return f"quiet: 1-min load average {one:.2f}"


# -- small helpers ----------------------------------------------------------------
def clean_env() -> dict[str, str]:
    """The environment without our settings or gunicorn's, so runs do not depend on the shell."""
    drop = ("ES_", "GUNICORN_", "DISPATCHER_")
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(drop)
        and k not in {"PROMETHEUS_MULTIPROC_DIR", "PORT", "HOST", "WEB_CONCURRENCY"}
    }


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return repr(value)


def write_catalog(path: Path, models: Mapping[str, Mapping[str, Any]]) -> Path:
    """A catalog TOML: model name -> provider options (``provider = "simulated"`` ...)."""
    lines: list[str] = []
    for name, table in models.items():
        lines.append(f'[models."{name}"]')
        lines += [f"{key} = {toml_value(value)}" for key, value in table.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


@dataclass(frozen=True)
class RegionConf:
    """One ``[regions.NAME]`` table of the regions file."""

    url: str
    concurrency: int
    models: tuple[str, ...]
    timeout_s: float = 60.0


def write_regions(path: Path, regions: Mapping[str, RegionConf]) -> Path:
    lines: list[str] = []
    for name, region in regions.items():
        lines += [
            f"[regions.{name}]",
            f"url = {toml_value(region.url)}",
            f"concurrency = {region.concurrency}",
            f"models = {toml_value(list(region.models))}",
            f"timeout_s = {region.timeout_s!r}",
            "",
        ]
    path.write_text("\n".join(lines))
    return path


# -- processes ----------------------------------------------------------------------
def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc)."""
    out: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # the command name may hold spaces or parentheses: fields start after the last ')'
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid:
            out.append(int(entry.name))
    return sorted(out)


def pids_with_cmdline(fragment: str) -> list[int]:
    """Processes whose command line contains ``fragment`` (e.g. the PostgreSQL backends
    serving one database: their titles name it)."""
    out: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if fragment in cmdline:
            out.append(int(entry.name))
    return out


def status_kb(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (peak RSS), RssAnon, RssFile of ``pid`` in kB, from /proc/<pid>/status."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in {"VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"}:
            out[key] = int(rest.split()[0])
    return out


def pss_kb(pid: int) -> int | None:
    """Proportional set size (shared pages split among their users), if the kernel has it."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` (its threads included) so far."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Process:
    """A child process with its log file; stopped with SIGTERM, then SIGKILL."""

    def __init__(self, name: str, argv: list[str], env: Mapping[str, str], log: Path) -> None:
        self.name = name
        self.argv = argv
        self.env = dict(env)
        self.log_path = log
        self.cwd = REPO  # another directory keeps ``python -m`` from importing this checkout
        self.proc: subprocess.Popen[bytes] | None = None

    def spawn(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv, cwd=self.cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_http(self, url: str, timeout: float = START_TIMEOUT_S) -> None:
        def up() -> bool:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited at start:\n{self.log_tail()}")
            return requests.get(url, timeout=2).status_code == 200

        try:
            wait_until(up, timeout, 0.1, f"{self.name} at {url}")
        except (TimeoutError, RuntimeError):
            self.stop()
            raise

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


class Executor(Process):
    """A real executor: gunicorn with the production config, simulated models only, access log
    and worker recycling off (the same worker processes serve the whole run)."""

    def __init__(
        self,
        tmp: Path,
        name: str,
        models: Mapping[str, Mapping[str, Any]],
        *,
        workers: int = 1,
        threads: int = 4,
        worker_class: str = "gthread",
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.description = f"{worker_class} {workers} worker(s)" + (
            f" x {threads} threads" if worker_class == "gthread" else ""
        )
        catalog = write_catalog(tmp / f"catalog-{name}-{self.port}.toml", models)
        metrics = Path(tempfile.mkdtemp(prefix="executor-metrics-", dir=tmp))
        full_env = {
            **clean_env(),
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "ES_CATALOG": str(catalog),
            "ES_REGION": name,
            "ES_REPLICA": f"{name}-1",
            "ES_LOG_LEVEL": "warning",
            "WEB_CONCURRENCY": str(workers),
            "GUNICORN_THREADS": str(threads),
            "GUNICORN_WORKER_CLASS": worker_class,
            "GUNICORN_MAX_REQUESTS": "0",
            "GUNICORN_ACCESSLOG": "",
            "GUNICORN_LOGLEVEL": "warning",
            "PROMETHEUS_MULTIPROC_DIR": str(metrics),
            **(env or {}),
        }
        argv = [sys.executable, "-m", "gunicorn", "-c", EXECUTOR_GUNICORN_CONFIG, EXECUTOR_APP]
        super().__init__(f"executor {name}", argv, full_env, tmp / f"executor-{name}.log")

    def start(self) -> Executor:
        self.spawn()
        self.wait_http(self.url + "/ready")
        return self

    def worker_pids(self) -> list[int]:
        return children(self.pid)


class Dispatcher(Process):
    """``executor-service dispatcher``: the region workers in this process, the HTTP API
    in a gunicorn child (``api=False``: ``--no-api``, region workers only)."""

    def __init__(
        self,
        tmp: Path,
        database_url: str,
        regions_file: Path,
        *,
        env: Mapping[str, str] | None = None,
        api: bool = True,
        name: str = "dispatcher",
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_enabled = api
        self.metrics_dir = metrics = Path(tempfile.mkdtemp(prefix="dispatcher-metrics-", dir=tmp))
        full_env = {
            **clean_env(),
            "ES_DATABASE_URL": database_url,
            "ES_REGIONS_FILE": str(regions_file),
            "ES_API_KEYS": ",".join(f"{t}:{k}" for t, k in KEYS.items()),
            "ES_LOG_LEVEL": "warning",
            # set, so the command does not re-exec itself to set it (the pid stays ours)
            "PROMETHEUS_MULTIPROC_DIR": str(metrics),
            **(env or {}),
        }
        argv = [sys.executable, "-m", "executor_service.cli", "dispatcher"]
        argv += ["--host", "127.0.0.1", "--port", str(self.port)]
        if not api:
            argv.append("--no-api")
        super().__init__(name, argv, full_env, tmp / f"{name}-{self.port}.log")

    def start(self) -> Dispatcher:
        self.spawn()
        if self.api_enabled:
            self.wait_http(self.url + "/health")
        else:
            time.sleep(1.0)  # nothing to poll; the store is opened within a second
            if not self.alive():
                raise RuntimeError(f"{self.name} exited at start:\n{self.log_tail()}")
        return self

    def api(self, tenant: str = "tenant-a") -> DispatcherAPI:
        return DispatcherAPI(self.url, KEYS[tenant], timeout_s=120.0)

    def metric_totals(self) -> dict[str, float]:
        """Every sample of the dispatcher's Prometheus metrics (both its processes write to
        one multiprocess directory), summed over labels: e.g. ``dispatcher_claim_seconds_sum``,
        ``dispatcher_claim_seconds_count``, ``dispatcher_claimed_total``."""
        from prometheus_client import CollectorRegistry, multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(self.metrics_dir))
        totals: dict[str, float] = {}
        for metric in registry.collect():
            for sample in metric.samples:
                if "le" in sample.labels:
                    continue  # histogram buckets
                totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
        return totals

    def process_tree(self) -> dict[str, int]:
        """role -> pid: the region-worker process, the API's gunicorn master and workers.
        ``dispatcher`` (``run``) supervises two children, ``dispatcher worker`` and
        ``dispatcher api``; with ``--no-api`` the region workers run in this pid."""
        if not self.api_enabled:
            return {"region workers": self.pid}
        tree = {"supervisor": self.pid}
        for child in children(self.pid):
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            if b"worker" in cmdline:
                tree["region workers"] = child
                continue
            tree["API gunicorn master"] = child
            for i, worker in enumerate(children(child)):
                tree[f"API worker {i + 1}"] = worker
        return tree

    def worker_pid(self) -> int:
        """The pid of the process that runs the region workers (claims, calls, results)."""
        return self.process_tree()["region workers"]


# -- stores ---------------------------------------------------------------------------
@contextlib.contextmanager
def store_url(kind: str, tmp: Path) -> Iterator[str]:
    """A database URL for a fresh store: a SQLite file in ``tmp``, or a new PostgreSQL
    database (created here, dropped on exit)."""
    if kind == "sqlite":
        yield f"sqlite:///{tmp / f'dispatcher-{uuid.uuid4().hex[:6]}.db'}"
        return
    if kind != "postgres":
        raise ValueError(f"store must be sqlite or postgres, not {kind!r}")
    import psycopg
    from psycopg import sql

    name = f"es_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield urlsplit(POSTGRES_URL)._replace(path="/" + name).geturl()
    finally:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@contextlib.contextmanager
def workdir(keep: bool = False) -> Iterator[Path]:
    """A temporary directory for catalogs, regions files, logs and SQLite files."""
    path = Path(tempfile.mkdtemp(prefix="bench-dispatcher-"))
    try:
        yield path
    finally:
        if keep:
            print(f"kept {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


# -- jobs -------------------------------------------------------------------------------
def wait_job_finished(api: DispatcherAPI, job_id: str, timeout: float) -> dict[str, Any]:
    """Wait until every execution of the job is final; return the job."""
    job: dict[str, Any] = wait_until(
        lambda: (view := api.job(job_id))["state"] in {"finished", "cancelled"} and view,
        timeout,
        0.05,
        f"job {job_id} to finish",
    )
    return job


def attempts(executions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every attempt of every execution (from ``GET /jobs/<id>/results``)."""
    return [a for e in executions for a in e["attempt_log"]]


def median(values: list[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
