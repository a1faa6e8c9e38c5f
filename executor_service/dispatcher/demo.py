"""``executor-service demo``: the whole system on one machine, in about a minute.

Starts three executors as the regions us-east, eu-west and asia-pacific (real
gunicorn processes on free loopback ports, each 1 worker x 2 threads to fit
two cores) serving the embedded SmolLM2 model, writes a regions file, starts
the dispatcher on SQLite, submits one job of short questions to every region,
shows live progress per region, prints every answer in full side by side, and
shuts everything down with SIGTERM. The store (``--store-dir``, by default
``$XDG_STATE_HOME/executor-service/demo``) is kept: the demo ends by printing the
commands that show the job again (``dispatcher api``, then ``status`` and ``results``).

``--simulated`` swaps the model for the simulated provider (a different
latency and answer per region) for a fast run in tests; it is never the
default. Everything the demo starts runs without API keys, on loopback only.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import requests

from .api_client import CLIError, DispatcherAPI
from .commands import follow_job

logger = logging.getLogger(__name__)

REGIONS = ("us-east", "eu-west", "asia-pacific")
DEFAULT_MODEL = "smollm2-135m"
QUESTIONS = (
    "What is the capital of France?",
    "Name one benefit of regular exercise.",
    "What colour is the sky on a clear day?",
    "Give one synonym for the word happy.",
)
# Two threads per executor: two calls in flight per region, six in all, on two cores.
EXECUTOR_THREADS = 2
# Loading the GGUF takes a fraction of a second; importing llama.cpp a few more.
START_TIMEOUT_S = 120.0
# Short answers keep the demo quick (~150 tokens/s on two cores, shared by three regions).
MAX_TOKENS = 48
# Simulated latencies per region (min, max) seconds: visibly different progress bars.
SIMULATED_LATENCY = {"us-east": (0.1, 0.2), "eu-west": (0.2, 0.4), "asia-pacific": (0.3, 0.6)}


def default_store_dir() -> Path:
    """Where the demo keeps its store between runs: the user's state directory (XDG)."""
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "executor-service" / "demo"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _clean_env() -> dict[str, str]:
    """The parent's environment without our own settings: the demo is self-contained
    (no API keys, default catalog, its own database), whatever the shell has set."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("ES_") and k not in {"PROMETHEUS_MULTIPROC_DIR", "PORT", "HOST"}
    }


@dataclass
class Child:
    """A process the demo started, with its log file."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    url: str

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(10)


def _spawn(name: str, argv: list[str], env: Mapping[str, str], tmp: Path, url: str) -> Child:
    log = tmp / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, env=dict(env), stdout=out, stderr=subprocess.STDOUT)
    return Child(name, proc, log, url)


def _wait_ready(child: Child, path: str, deadline: float) -> None:
    while time.monotonic() < deadline:
        if not child.alive():
            raise CLIError(f"{child.name} exited at start:\n{child.tail()}")
        try:
            if requests.get(child.url + path, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise CLIError(f"{child.name} did not become ready:\n{child.tail()}")


def simulated_catalog(region: str, model: str) -> str:
    low, high = SIMULATED_LATENCY.get(region, (0.1, 0.3))
    return (
        f'[models."{model}"]\n'
        'provider = "simulated"\n'
        f"latency_min_s = {low}\n"
        f"latency_max_s = {high}\n"
        f'output = "({region}) simulated answer to: {{prompt}}"\n'
    )


def regions_toml(executors: Mapping[str, Child], model: str) -> str:
    lines = []
    for region, child in executors.items():
        lines += [
            f"[regions.{region}]",
            f'url = "{child.url}"',
            f"concurrency = {EXECUTOR_THREADS}",
            f'models = ["{model}"]',
            "timeout_s = 120",
            "",
        ]
    return "\n".join(lines)


def start_executor(region: str, tmp: Path, model: str, simulated: bool) -> Child:
    port = _free_port()
    metrics = tmp / f"metrics-{region}"
    metrics.mkdir()
    env = {
        **_clean_env(),
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "WEB_CONCURRENCY": "1",
        "GUNICORN_THREADS": str(EXECUTOR_THREADS),
        "GUNICORN_ACCESSLOG": "",
        "PROMETHEUS_MULTIPROC_DIR": str(metrics),
        "ES_REGION": region,
        "ES_REPLICA": f"{region}-1",
        "ES_LOG_LEVEL": "warning",
    }
    if simulated:
        catalog = tmp / f"catalog-{region}.toml"
        catalog.write_text(simulated_catalog(region, model))
        env["ES_CATALOG"] = str(catalog)
    argv = [
        sys.executable,
        "-m",
        "gunicorn",
        "-c",
        "python:executor_service.executor.gunicorn_config",
        "executor_service:create_app()",
    ]
    return _spawn(f"executor-{region}", argv, env, tmp, f"http://127.0.0.1:{port}")


def start_dispatcher(tmp: Path, regions_file: Path, database: Path) -> Child:
    port = _free_port()
    env = {
        **_clean_env(),
        "ES_DATABASE_URL": f"sqlite:///{database}",
        "ES_REGIONS_FILE": str(regions_file),
        "ES_LOG_LEVEL": "warning",
        # A demo on a laptop: recover quickly if something is killed, back off briefly.
        "ES_LEASE_S": "30",
        "ES_BACKOFF_BASE_S": "0.5",
        "ES_SHUTDOWN_GRACE_S": "10",
    }
    argv = [sys.executable, "-m", "executor_service.cli", "dispatcher", "--port", str(port)]
    return _spawn("dispatcher", argv, env, tmp, f"http://127.0.0.1:{port}")


def print_side_by_side(
    results: Mapping[str, Any], console: Any, regions: list[str] | None = None
) -> None:
    """One row per question, one column per region: every answer in full, wrapped (never
    cut: a long word folds onto the next line instead of ending in an ellipsis)."""
    from rich.table import Table
    from rich.text import Text

    seen = list(dict.fromkeys(e["requested_region"] for e in results["executions"]))
    regions = [r for r in regions or [] if r in seen] + [
        r for r in seen if r not in (regions or [])
    ]
    cells: dict[tuple[int, str], str] = {}
    questions: dict[int, str] = {}
    for e in results["executions"]:
        questions[e["question_index"]] = e["question"]
        if e["state"] == "succeeded":
            text = " ".join((e["output"] or "").split())
            if e.get("finish_reason") == "length":
                text += " [cut at the token limit]"
        else:
            err = e.get("last_error") or {}
            text = f"[{e['state']}] {err.get('code', '')}"
        cells[(e["question_index"], e["requested_region"])] = text
    table = Table(title="answers by region", show_lines=True)
    table.add_column("question", overflow="fold", ratio=2)
    for region in regions:
        table.add_column(region, overflow="fold", ratio=3)
    for index in sorted(questions):
        # Text, not markup: "[dead] ..." and a model's own brackets are shown as they are.
        row = [questions[index], *(cells.get((index, r), "") for r in regions)]
        table.add_row(*(Text(cell) for cell in row))
    console.print(table)


def _command(argv: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)


def how_to_look_again(store_dir: Path, job_id: str) -> list[str]:
    """The commands that show the job after the demo: the API on the kept store (it
    calls no executor), then ``status`` and ``results`` against it (ES_DISPATCHER_URL's
    default, port 8100)."""
    found = shutil.which("executor-service")
    here = Path(sys.executable).parent / "executor-service"
    cli = found if found and Path(found).resolve() == here.resolve() else str(here)
    if Path(cli).is_absolute() and Path(cli).is_relative_to(Path.cwd()):
        cli = str(Path(cli).relative_to(Path.cwd()))
    database = shlex.quote(f"sqlite:///{store_dir / 'dispatcher.db'}")
    regions = shlex.quote(str(store_dir / "regions.toml"))
    api = f"ES_DATABASE_URL={database} ES_REGIONS_FILE={regions}"
    return [
        f"{api} {_command([cli, 'dispatcher', 'api'])} &",
        _command([cli, "status", job_id]),
        _command([cli, "results", job_id, "--format", "table"]),
        "kill %1   # stops the API",
    ]


def run_demo(
    model: str, simulated: bool, questions: int, max_tokens: int, store_dir: Path | None = None
) -> int:
    from rich.console import Console

    # Status lines are never wrapped (soft_wrap): a log or a pipe gets them whole.
    console = Console(soft_wrap=True)
    table_console = Console()
    store_dir = (store_dir or default_store_dir()).resolve()
    tmp = Path(tempfile.mkdtemp(prefix="executor-service-demo-"))
    children: list[Child] = []
    kind = "simulated" if simulated else "embedded"
    job_id = ""
    try:
        store_dir.mkdir(parents=True, exist_ok=True)
        console.print(f"starting 3 executors ({kind} model {model}): {', '.join(REGIONS)}")
        executors = {r: start_executor(r, tmp, model, simulated) for r in REGIONS}
        children += executors.values()
        deadline = time.monotonic() + START_TIMEOUT_S
        for child in executors.values():
            _wait_ready(child, "/ready", deadline)
        # Kept with the store: the API that shows the job later needs the regions' names.
        regions_file = store_dir / "regions.toml"
        regions_file.write_text(regions_toml(executors, model))
        database = store_dir / "dispatcher.db"
        console.print(f"starting the dispatcher (SQLite: {database}) ...")
        dispatcher = start_dispatcher(tmp, regions_file, database)
        children.append(dispatcher)
        _wait_ready(dispatcher, "/health", time.monotonic() + START_TIMEOUT_S)
        api = DispatcherAPI(dispatcher.url)
        asked = list(QUESTIONS[:questions])
        job = api.submit(
            {
                "questions": asked,
                "models": [model],
                "regions": list(REGIONS),
                # Comparing regions: an answer must come from the region it is shown under.
                "failover": "none",
                "params": {"max_tokens": max_tokens, "temperature": 0.0, "seed": 42},
            }
        )
        job_id = job["id"]
        console.print(f"job {job_id}: {len(asked)} questions x 3 regions")
        started = time.monotonic()
        job = follow_job(api, job_id, console)
        elapsed = time.monotonic() - started
        print_side_by_side(api.results(job_id), table_console, list(REGIONS))
        states = job["states"]
        console.print(
            f"{states.get('succeeded', 0)}/{job['total']} answered in {elapsed:.1f} s"
            f" (answers of at most {max_tokens} tokens: --max-tokens)"
            + (f", {states['dead']} failed" if states.get("dead") else "")
        )
        return 0
    except CLIError as exc:
        console.print(f"[red]demo failed:[/red] {exc}")
        return 1
    except KeyboardInterrupt:
        console.print("interrupted")
        return 130
    finally:
        console.print("shutting down ...")
        # The dispatcher first, so no call is cut off by an executor going away.
        for child in reversed(children):
            child.stop()
        shutil.rmtree(tmp, ignore_errors=True)  # logs and metrics; the store is kept
        if job_id:
            console.print(f"The job is kept in {store_dir / 'dispatcher.db'}. To look at it again:")
            for line in how_to_look_again(store_dir, job_id):
                console.print(f"  {line}", markup=False, highlight=False)


@click.command("demo")
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="model name")
@click.option(
    "--simulated", is_flag=True, help="simulated model instead of the embedded one (fast; tests)"
)
@click.option("--questions", type=click.IntRange(1, len(QUESTIONS)), default=len(QUESTIONS))
@click.option("--max-tokens", type=int, default=MAX_TOKENS, show_default=True)
@click.option(
    "--store-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="where the job's store is kept [default: $XDG_STATE_HOME/executor-service/demo]",
)
def demo(
    model: str, simulated: bool, questions: int, max_tokens: int, store_dir: Path | None
) -> None:
    """Three local regions, a dispatcher and one job, end to end."""
    sys.exit(run_demo(model, simulated, questions, max_tokens, store_dir))
