"""The dispatcher's processes, as ``executor-service dispatcher`` commands:

    dispatcher api [--host H] [--port P]   the HTTP API under gunicorn (this process becomes
                                           gunicorn): reads and writes the store, never
                                           calls executors
    dispatcher worker                      the region workers: claim, call, record. SIGTERM:
                                           stop claiming, let calls in flight finish
                                           (ES_SHUTDOWN_GRACE_S), release the rest, exit
    dispatcher [run] [--host H] [--port P] [--no-api]
                                           a convenience: both of the above as two child
                                           processes (--no-api: ``dispatcher worker``)

In production the platform runs ``dispatcher api`` and ``dispatcher worker`` as separate
processes and supervises them; ``dispatcher`` (run) is for one host and the demo: it
starts both with a shared PROMETHEUS_MULTIPROC_DIR (so the API's /metrics shows the
workers' counters), passes SIGTERM/SIGINT on to both, and when one exits stops the
other. With SQLite both processes share the file (WAL mode). The client commands
(submit, status, results) are in ``commands.py``, their HTTP client in ``api_client.py``.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import click

from .api_client import CLIError, DispatcherAPI  # noqa: F401  (re-exported: older imports)

logger = logging.getLogger(__name__)

API_APP = "executor_service.dispatcher.api:create_dispatcher_app()"
API_GUNICORN_CONFIG = "python:executor_service.dispatcher.gunicorn_config"
DEFAULT_PORT = 8100
# The worker's own /metrics when it runs without an API beside it (next to the API's port).
DEFAULT_WORKER_METRICS_PORT = 8101
# After the children were asked to stop: the workers' grace, plus this, then SIGKILL.
STOP_MARGIN_S = 5.0

host_option = click.option(
    "--host", default=lambda: os.environ.get("HOST", "127.0.0.1"), show_default="HOST or 127.0.0.1"
)
port_option = click.option("--port", type=int, default=DEFAULT_PORT, show_default=True)
no_api_option = click.option(
    "--no-api", is_flag=True, help="region workers only (more workers on PostgreSQL)"
)


def _load_settings() -> Any:
    """The dispatcher's settings and regions, validated before anything touches the store:
    a bad value (or a region's missing API key variable) stops here, naming the variable."""
    from .config import DispatcherSettings
    from .regions import Regions

    settings = DispatcherSettings.from_env()
    regions = Regions.load(settings.regions_file)
    for region in regions:
        region.api_key()
    return settings, regions


def _shown_url(database_url: str) -> str:
    """The URL without its password, fit for a message."""
    parts = urlsplit(database_url)
    if parts.password is None:
        return database_url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def open_configured_store(database_url: str) -> Any:
    """``open_store`` (and migrate), a failure said in one line that names ES_DATABASE_URL:
    a wrong database name, host or password is a setting to fix, not a traceback."""
    from ..config import ConfigError
    from .store import StoreError, open_store

    try:
        return open_store(database_url)
    except StoreError as exc:
        detail = " ".join(str(exc).split())  # psycopg's messages span lines
        raise ConfigError(
            f"ES_DATABASE_URL={_shown_url(database_url)}: {detail} (check the host, port, "
            "database name and credentials; a PostgreSQL database must exist: createdb NAME)"
        ) from None


API_ARGV = [sys.executable, "-m", "gunicorn", "-c", API_GUNICORN_CONFIG, API_APP]


@click.group("dispatcher", invoke_without_command=True)
@host_option
@port_option
@no_api_option
@click.pass_context
def dispatcher(ctx: click.Context, host: str, port: int, no_api: bool) -> None:
    """Run the dispatcher: its HTTP API and its region workers (see ``dispatcher run``)."""
    if ctx.invoked_subcommand is None:
        sys.exit(run_both(host, port, no_api))


@dispatcher.command("run")
@host_option
@port_option
@no_api_option
def run(host: str, port: int, no_api: bool) -> None:
    """The API and the region workers as two child processes, stopped together."""
    sys.exit(run_both(host, port, no_api))


@dispatcher.command("api")
@host_option
@port_option
def api(host: str, port: int) -> None:
    """The HTTP API under gunicorn (this process becomes gunicorn)."""
    settings, _regions = _load_settings()
    open_configured_store(settings.database_url).close()  # one line if it cannot open
    env = {**os.environ, "HOST": host, "PORT": str(port)}
    os.execvpe(API_ARGV[0], API_ARGV, env)


@dispatcher.command("worker")
@host_option
@click.option(
    "--metrics-port",
    type=int,
    envvar="ES_WORKER_METRICS_PORT",
    default=DEFAULT_WORKER_METRICS_PORT,
    show_default=True,
    help="serve this process's /metrics here (0: off; ES_WORKER_METRICS_PORT)",
)
def worker(host: str, metrics_port: int) -> None:
    """The region workers, until SIGTERM or SIGINT."""
    sys.exit(run_worker(host, metrics_port))


def serve_own_metrics(host: str, port: int) -> None:
    """``/metrics`` of a worker that runs without an API beside it.

    The worker's counters (calls, claims, retries, dead letters) live in this process;
    with no PROMETHEUS_MULTIPROC_DIR shared with an API, nothing else could export them
    (a platform running ``dispatcher worker`` on its own exported none). Under
    ``dispatcher run`` the API exports them from the shared directory instead.
    """
    if port <= 0 or os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return
    from prometheus_client import start_http_server

    start_http_server(port, addr=host)
    logger.info("worker metrics on http://%s:%s/metrics", host, port)


def run_worker(host: str = "127.0.0.1", metrics_port: int = 0) -> int:
    """Claim, call and record until a signal; then stop gracefully. Returns the exit code."""
    from .. import observability
    from .worker import Dispatcher, WorkerConfig

    settings, regions = _load_settings()
    observability.configure_logging(settings)
    serve_own_metrics(host, metrics_port)
    stop = threading.Event()

    def _on_signal(signum: int, _frame: Any) -> None:
        logger.info("signal %s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    store = open_configured_store(settings.database_url)
    try:
        Dispatcher(store, regions, WorkerConfig.from_settings(settings)).run(stop)
    finally:
        store.close()
    return 0


def run_both(host: str, port: int, no_api: bool) -> int:
    """``dispatcher run``: the worker and the API as child processes. Returns 0 when they
    stopped because we were asked to stop and both exited 0. ``no_api``: the worker
    alone, in this process (``dispatcher worker``)."""
    if no_api:
        metrics_port = os.environ.get("ES_WORKER_METRICS_PORT", "").strip()
        return run_worker(host, int(metrics_port) if metrics_port else DEFAULT_WORKER_METRICS_PORT)
    settings, _regions = _load_settings()
    open_configured_store(settings.database_url).close()  # migrate once, before the children
    env = dict(os.environ)
    own_metrics = None
    if not env.get("PROMETHEUS_MULTIPROC_DIR"):
        own_metrics = env["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(
            prefix="dispatcher-metrics-"
        )
    me = [sys.executable, "-m", "executor_service.cli", "dispatcher"]
    argvs = [[*me, "worker"], [*me, "api", "--host", host, "--port", str(port)]]
    children: dict[int, subprocess.Popen[bytes]] = {}
    asked_to_stop = False

    def stop_children() -> None:
        for child in children.values():
            if child.returncode is None:
                child.send_signal(signal.SIGTERM)

    def on_signal(signum: int, _frame: Any) -> None:
        nonlocal asked_to_stop
        asked_to_stop = True
        stop_children()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        for argv in argvs:
            child = subprocess.Popen(argv, env=env)
            children[child.pid] = child
        # The first child to exit: after our SIGTERM, or on its own (a failure).
        pid, status = os.wait()
        if pid in children:
            children[pid].returncode = os.waitstatus_to_exitcode(status)
        stop_children()
        for child in children.values():
            try:
                child.wait(settings.shutdown_grace_s + STOP_MARGIN_S)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
    finally:
        if own_metrics:
            shutil.rmtree(own_metrics, ignore_errors=True)
    codes = [child.returncode for child in children.values()]
    if not asked_to_stop:
        logger.error("a dispatcher process exited (codes %s): stopped the other", codes)
        return 1
    return 0 if all(code == 0 for code in codes) else 1
