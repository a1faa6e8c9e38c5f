"""Every documented way to start a server, on its defaults, with nothing in front of it:

- ``executor-service serve``;
- ``gunicorn -c gunicorn.conf.py wsgi:app`` (the container's command);
- ``executor-service dispatcher`` (API and worker) and ``executor-service dispatcher api``;
- ``executor-service dispatcher worker`` alone (metrics only: it serves no other route).

Each one must keep answering while idle sockets and slowloris clients are held open
(target E4: no proxy buffers for ``make demo`` or a direct deployment), and must export
metrics at ``/metrics`` without the caller setting ``PROMETHEUS_MULTIPROC_DIR``.

No ``GUNICORN_*``, ``WEB_CONCURRENCY`` or ``PROMETHEUS_*`` variable reaches the servers:
only a catalog of simulated models (an app setting, not a server one) and the
loopback address.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from dispatcher_harness import API_KEYS, KEYS, executor, write_regions
from support import REPO, HostileClients, free_port, wait_until, write_catalog

pytestmark = pytest.mark.slow

SIM = {"sim": {"provider": "simulated", "latency_s": 0.05}}
# A frozen server is frozen for seconds to minutes; an answering one takes milliseconds.
# The bound only separates the two (tests do not time, benchmarks do: bench/executor_hostile.py).
FROZEN_S = 3.0


def server_env(tmp: Path) -> dict[str, str]:
    """The environment of the test run without any server setting."""
    drop = ("GUNICORN_", "PROMETHEUS_", "ES_", "DISPATCHER_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    for name in ("WEB_CONCURRENCY", "HOST", "PORT"):
        env.pop(name, None)
    env["ES_CATALOG"] = str(write_catalog(tmp / "catalog.toml", SIM))
    # gunicorn's control socket would be $XDG_RUNTIME_DIR or $HOME/.gunicorn/gunicorn.ctl
    env.pop("XDG_RUNTIME_DIR", None)
    env["HOME"] = str(tmp / "home")
    env["ES_LOG_LEVEL"] = "warning"
    return env


@dataclass
class Started:
    name: str
    url: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path
    headers: dict[str, str]
    probe: str  # a store- or model-bound route answered 200

    def text(self) -> str:
        return self.log.read_text(errors="replace")


def _start(name: str, argv: list[str], env: dict[str, str], tmp: Path, port: int) -> Started:
    log = tmp / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{log.read_text()}")
        return requests.get(url + "/health", timeout=2).status_code == 200

    try:
        wait_until(up, 90, what=f"{name} on {url}")
    except BaseException:
        proc.kill()
        proc.wait(10)
        raise
    return Started(name, url, port, proc, log, {}, "")


@pytest.fixture(params=["serve", "container", "dispatcher", "dispatcher-api"])
def started(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Started]:
    env = server_env(tmp_path)
    port = free_port()
    cli = str(Path(sys.executable).parent / "executor-service")
    if request.param == "serve":
        server = _start("serve", [cli, "serve", "--port", str(port)], env, tmp_path, port)
        server.probe = "/execute"
        yield from _running(server)
    elif request.param == "container":
        # The Dockerfile's CMD, run from the repository as the image runs it from /app.
        env.update(HOST="127.0.0.1", PORT=str(port))
        argv = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"]
        server = _start("container", argv, env, tmp_path, port)
        server.probe = "/execute"
        yield from _running(server)
    else:
        with executor(tmp_path, "r1", SIM) as region:
            regions = write_regions(tmp_path / "regions.toml", {"r1": (region.url, 2, ["sim"])})
            env.update(
                ES_REGIONS_FILE=str(regions),
                ES_DATABASE_URL=f"sqlite:///{tmp_path / 'dispatcher.db'}",
                ES_API_KEYS=API_KEYS,
            )
            argv = [cli, "dispatcher", "--port", str(port)]
            if request.param == "dispatcher-api":
                argv = [cli, "dispatcher", "api", "--port", str(port)]
            server = _start(request.param, argv, env, tmp_path, port)
            server.headers = {"Authorization": f"Bearer {KEYS['alice']}"}
            server.probe = "/queue"
            yield from _running(server)


def _running(server: Started) -> Iterator[Started]:
    try:
        yield server
    finally:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(40)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait(10)


def probe(server: Started) -> requests.Response:
    if server.probe == "/execute":
        return requests.post(
            server.url + "/execute",
            json={"model": "sim", "prompt": "What is 2+2?"},
            headers=server.headers,
            timeout=FROZEN_S,
        )
    return requests.get(server.url + server.probe, headers=server.headers, timeout=FROZEN_S)


def test_idle_and_slowloris_clients_do_not_freeze_the_server(started: Started) -> None:
    assert probe(started).status_code == 200
    with HostileClients(started.port, idle=64, slowloris=16):
        # The hostile sockets are all accepted or queued by now; let the slow ones drip.
        time.sleep(1.5)  # not synchronisation: the attack must last longer than one drip
        for _ in range(5):
            started_at = time.monotonic()
            health = requests.get(started.url + "/health", timeout=FROZEN_S)
            assert health.status_code == 200
            assert time.monotonic() - started_at < FROZEN_S
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: probe(started), range(8)))
        assert [a.status_code for a in answers] == [200] * 8, [a.text for a in answers]
    assert started.proc.poll() is None


def metric_total(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_no_control_socket_shared_by_every_gunicorn_of_the_host(
    started: Started, tmp_path: Path
) -> None:
    assert probe(started).status_code == 200
    assert not (tmp_path / "home" / ".gunicorn").exists()


def test_metrics_are_exported_without_any_setting(started: Started) -> None:
    for _ in range(3):
        assert probe(started).status_code == 200
    metrics = requests.get(started.url + "/metrics", headers=started.headers, timeout=10)
    assert metrics.status_code == 200
    if started.probe == "/execute":
        assert metric_total(metrics.text, "executor_requests_total") >= 3, metrics.text[:2000]
        assert metric_total(metrics.text, "executor_request_seconds_count") >= 3
    else:
        # The queue depths the API reads from the store, per region of the regions file.
        assert 'dispatcher_queue_depth{queue="queued",region="r1"}' in metrics.text, metrics.text[
            :2000
        ]


def test_chunked_body_over_the_limit_is_413(started: Started) -> None:
    route = "/execute" if started.probe == "/execute" else "/jobs"

    def body(kib: int) -> Iterator[bytes]:  # no Content-Length: requests sends it chunked
        yield b'{"model": "sim", "prompt": "'
        for _ in range(kib):
            yield b"x" * 1024
        yield b'"}'

    headers = {**started.headers, "Content-Type": "application/json"}
    r = requests.post(started.url + route, data=body(2048), headers=headers, timeout=30)
    assert r.status_code == 413, r.text[:300]
    assert r.json()["error"]["code"] == "payload_too_large"
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    assert r.headers["Cache-Control"] == "no-store"


def test_a_worker_alone_serves_its_metrics(tmp_path: Path) -> None:
    """``dispatcher worker`` as a platform runs it, beside an API in another container:
    its calls and claims are counted in this process, so it exports them itself."""
    env = server_env(tmp_path)
    port = free_port()
    cli = str(Path(sys.executable).parent / "executor-service")
    with executor(tmp_path, "r1", SIM) as region:
        regions = write_regions(tmp_path / "regions.toml", {"r1": (region.url, 2, ["sim"])})
        db = f"sqlite:///{tmp_path / 'dispatcher.db'}"
        env.update(ES_REGIONS_FILE=str(regions), ES_DATABASE_URL=db, ES_API_KEYS=API_KEYS)
        env["ES_WORKER_METRICS_PORT"] = str(port)
        log = tmp_path / "worker.log"
        with log.open("wb") as out:
            worker = subprocess.Popen(
                [cli, "dispatcher", "worker"],
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            url = f"http://127.0.0.1:{port}/metrics"

            def claims() -> bool:
                if worker.poll() is not None:
                    raise RuntimeError(log.read_text())
                text = requests.get(url, timeout=2).text
                return 'dispatcher_claim_seconds_count{region="r1"}' in text

            wait_until(claims, 60, what="the worker's claim metrics")
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(40)
