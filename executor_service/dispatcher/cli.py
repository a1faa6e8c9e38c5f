"""The dispatcher's commands, added to ``executor-service`` by ``add_commands``.

    dispatcher [--host H] [--port P] [--no-api]
        The HTTP API under gunicorn (a child process) and the region workers, as
        threads of this process: never inside gunicorn's request workers, so a
        worker recycled by gunicorn cannot take calls in flight with it. With
        SQLite both processes share the file (WAL mode). SIGTERM: stop claiming,
        let calls in flight finish (ES_SHUTDOWN_GRACE_S), release the rest, exit.
    submit JOBFILE [--follow]     a JSON or TOML job; --follow shows a progress bar per region
                                  and exits 0 only if every execution succeeded
    status JOB                    counts per region and state, progress, ETA
    results JOB [--format table|json|csv]
    demo                          see ``demo.py``

``submit``, ``status`` and ``results`` talk HTTP to the API at ES_DISPATCHER_URL
(default http://127.0.0.1:8100) with the key in ES_DISPATCHER_KEY.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import requests

logger = logging.getLogger(__name__)

API_APP = "executor_service.dispatcher.api:create_dispatcher_app()"
API_GUNICORN_CONFIG = "python:executor_service.dispatcher.gunicorn_config"
# Set when this command made the metrics directory itself (and must remove it).
OWN_METRICS_ENV = "ES_DISPATCHER_OWN_METRICS_DIR"
# The API answers /health within a second or two of starting; 30 s means it failed.
API_START_TIMEOUT_S = 30.0
# How often --follow and the demo ask for progress: smooth bars, negligible load.
FOLLOW_POLL_S = 0.5
FINAL = ("succeeded", "dead", "cancelled")
STATE_COLUMNS = ("queued", "leased", "retry_wait", "succeeded", "dead", "cancelled")
PR_SET_PDEATHSIG = 1


class CLIError(Exception):
    """A command failed in a way the user can act on; the message says how."""


# -- the HTTP client of the API ------------------------------------------------
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
        return self._request("GET", f"/jobs/{job_id}/results").json()

    def results_csv(self, job_id: str) -> str:
        return self._request("GET", f"/jobs/{job_id}/results", params={"format": "csv"}).text

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._request("POST", f"/jobs/{job_id}/cancel").json()

    def queue(self) -> dict[str, Any]:
        return self._request("GET", "/queue").json()


def _api_from_env() -> DispatcherAPI:
    from ..config import Settings

    settings = Settings.from_env()
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


# -- progress and tables ---------------------------------------------------------
def region_progress(job: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """requested region -> (executions in a final state, executions)."""
    out: dict[str, tuple[int, int]] = {}
    for region, states in sorted(job["counts"].items()):
        out[region] = (sum(states.get(s, 0) for s in FINAL), sum(states.values()))
    return out


def follow(api: DispatcherAPI, job_id: str, console: Any = None) -> dict[str, Any]:
    """Show one live progress bar per region until the job is finished; return the job."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = console or Console()
    job = api.job(job_id)
    with Progress(
        TextColumn("{task.description:<14}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        tasks = {
            region: progress.add_task(region, total=total, detail="")
            for region, (_, total) in region_progress(job).items()
        }
        while True:
            for region, (done, total) in region_progress(job).items():
                states = job["counts"].get(region, {})
                detail = ", ".join(
                    f"{s} {states[s]}" for s in ("leased", "retry_wait", "dead") if states.get(s)
                )
                progress.update(tasks[region], completed=done, total=total, detail=detail)
            if job["state"] in ("finished", "cancelled"):
                break
            time.sleep(FOLLOW_POLL_S)
            job = api.job(job_id)
    return job


def print_status(job: Mapping[str, Any], console: Any) -> None:
    from rich.table import Table

    table = Table(title=f"job {job['id']} ({job['state']})")
    table.add_column("region")
    for name in STATE_COLUMNS:
        table.add_column(name, justify="right")
    table.add_column("total", justify="right")
    for region, states in sorted(job["counts"].items()):
        table.add_row(
            region,
            *(str(states.get(s, 0)) for s in STATE_COLUMNS),
            str(sum(states.values())),
        )
    console.print(table)
    progress = job["progress"]
    eta = job.get("eta_s")
    console.print(
        f"{progress['done']}/{progress['total']} done ({progress['fraction']:.0%})"
        + ("" if eta is None else f", ETA {eta:.1f} s")
    )


def _clip(text: str | None, width: int) -> str:
    text = (text or "").replace("\n", " ").strip()
    return text if len(text) <= width else text[: width - 1] + "…"


def print_results_table(results: Mapping[str, Any], console: Any) -> None:
    from rich.table import Table

    table = Table(title=f"job {results['job_id']} ({results['state']})")
    for name in ("#", "question", "model", "region", "ran in", "state", "tries", "answer / error"):
        table.add_column(name)
    for e in results["executions"]:
        answer = e["output"]
        if answer is None and e.get("last_error"):
            answer = f"{e['last_error'].get('code')}: {e['last_error'].get('message')}"
        table.add_row(
            str(e["question_index"]),
            _clip(e["question"], 40),
            e["model"],
            e["requested_region"],
            e["executed_region"] or "",
            e["state"],
            str(e["attempts"]),
            _clip(answer, 80),
        )
    console.print(table)


# -- client commands ---------------------------------------------------------------
def _submit(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console()
    api = _api_from_env()
    job = api.submit(load_job_file(args.jobfile), args.idempotency_key)
    console.print(f"job {job['id']}: {job['total']} executions ({job['state']})")
    if not args.follow:
        return 0
    job = follow(api, job["id"], console)
    print_status(job, console)
    return 0 if job["states"].get("succeeded", 0) == job["total"] else 1


def _status(args: argparse.Namespace) -> int:
    from rich.console import Console

    job = _api_from_env().job(args.job)
    if args.json:
        print(json.dumps(job, indent=2))
    else:
        print_status(job, Console())
    return 0


def _results(args: argparse.Namespace) -> int:
    from rich.console import Console

    api = _api_from_env()
    if args.format == "csv":
        sys.stdout.write(api.results_csv(args.job))
    elif args.format == "json":
        print(json.dumps(api.results(args.job), indent=2))
    else:
        print_results_table(api.results(args.job), Console())
    return 0


# -- the dispatcher process ----------------------------------------------------------
def _die_with_parent() -> None:
    """In the API child: get SIGTERM if the dispatcher process dies, even by SIGKILL,
    so a crashed dispatcher never leaves an orphan API holding its port (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def start_api(host: str, port: int, env: Mapping[str, str]) -> subprocess.Popen[bytes]:
    """The API under gunicorn, as a child process that dies with this one."""
    child_env = {**env, "HOST": host, "PORT": str(port)}
    return subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", API_GUNICORN_CONFIG, API_APP],
        env=child_env,
        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
    )


def _wait_api(proc: subprocess.Popen[bytes], url: str, stop: threading.Event) -> None:
    deadline = time.monotonic() + API_START_TIMEOUT_S
    while time.monotonic() < deadline and not stop.is_set():
        if proc.poll() is not None:
            raise CLIError(f"the API process exited with {proc.returncode} at start")
        try:
            if requests.get(url + "/health", timeout=1).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.1)
    if not stop.is_set():
        raise CLIError(f"the API did not answer on {url} within {API_START_TIMEOUT_S:g} s")


def _reexec_with_metrics_dir(args: argparse.Namespace) -> None:
    """Run again with PROMETHEUS_MULTIPROC_DIR set: prometheus_client picks its
    storage at import, which has already happened in this process."""
    metrics_dir = tempfile.mkdtemp(prefix="dispatcher-metrics-")
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": metrics_dir, OWN_METRICS_ENV: metrics_dir}
    argv = [sys.executable, "-m", "executor_service.cli", "dispatcher"]
    argv += ["--host", args.host, "--port", str(args.port)]
    if args.no_api:
        argv.append("--no-api")
    os.execvpe(sys.executable, argv, env)


def _dispatcher(args: argparse.Namespace) -> int:
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        _reexec_with_metrics_dir(args)  # does not return
    from .. import observability
    from ..config import Settings
    from .regions import Regions
    from .store import open_store
    from .worker import Dispatcher, WorkerConfig

    settings = Settings.from_env()
    observability.configure_logging(settings)
    regions = Regions.load(settings.regions_file)
    store = open_store(settings.database_url)  # migrations run once, before the API starts
    stop = threading.Event()

    def _on_signal(signum: int, _frame: Any) -> None:
        logger.info("signal %s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    api: subprocess.Popen[bytes] | None = None
    dispatcher: Dispatcher | None = None
    code = 0
    try:
        dispatcher = Dispatcher(store, regions, WorkerConfig.from_settings(settings))
        if not args.no_api:
            api = start_api(args.host, args.port, os.environ)
            _wait_api(api, f"http://{args.host}:{args.port}", stop)
            logger.info("dispatcher API on http://%s:%s", args.host, args.port)
        dispatcher.start()
        while not stop.wait(0.5):
            if api is not None and api.poll() is not None:
                logger.error("the API process exited with %s; stopping", api.returncode)
                code = 1
                break
    except CLIError as exc:
        logger.error("%s", exc)
        code = 1
    finally:
        # The API and the workers stop side by side: gunicorn drains its requests
        # while the workers finish or release their calls.
        if api is not None and api.poll() is None:
            api.send_signal(signal.SIGTERM)
        if dispatcher is not None:
            dispatcher.stop()
        if api is not None:
            try:
                api.wait(settings.shutdown_grace_s + 5)
            except subprocess.TimeoutExpired:
                api.kill()
                api.wait()
        store.close()
        own = os.environ.get(OWN_METRICS_ENV)
        if own and own == os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            shutil.rmtree(own, ignore_errors=True)
    return code


def _guard(func: Any) -> Any:
    """Turn CLIError into a message on stderr and exit code 1."""

    def run(args: argparse.Namespace) -> int:
        try:
            return int(func(args) or 0)
        except CLIError as exc:
            print(f"executor-service {args.command}: {exc}", file=sys.stderr)
            return 1

    return run


def add_commands(sub: Any) -> None:
    """Add dispatcher, submit, status, results and demo to the ``executor-service`` parser."""
    p = sub.add_parser("dispatcher", help="run the dispatcher: HTTP API and region workers")
    p.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=8100)
    p.add_argument(
        "--no-api", action="store_true", help="region workers only (more workers on PostgreSQL)"
    )
    p.set_defaults(func=_guard(_dispatcher))

    p = sub.add_parser("submit", help="submit a job file (JSON or TOML)")
    p.add_argument("jobfile", help="path to a .json or .toml job, or - for JSON on stdin")
    p.add_argument("--follow", action="store_true", help="show live progress per region")
    p.add_argument("--idempotency-key", help="submitting twice gives the same job")
    p.set_defaults(func=_guard(_submit))

    p = sub.add_parser("status", help="a job's progress per region and state")
    p.add_argument("job")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_guard(_status))

    p = sub.add_parser("results", help="a job's results")
    p.add_argument("job")
    p.add_argument("--format", choices=["table", "json", "csv"], default="table")
    p.set_defaults(func=_guard(_results))

    from .demo import add_command as add_demo

    add_demo(sub)
