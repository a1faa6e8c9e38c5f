"""The container app's probes against a real, busy gunicorn: what a probe waits for when
every slot runs a model call, under each worker class the Terraform can configure.

Probes and model calls share gunicorn's workers. /ready itself costs a flag check; under
gthread (a worker accepts only as many connections as it has threads) a probe waits in
the listen backlog until a call ends, under gevent it is answered beside the calls.
"""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import Gunicorn, write_catalog
from test_deploy_terraform import REGION_MODULE, Config, evaluate

pytestmark = [pytest.mark.deploy, pytest.mark.slow]

LATENCY_S = 5.0  # one simulated model call: longer than the unfixed probe timeout
UNFIXED_TIMEOUT_S = 3  # the readiness timeout terraform/ had before issue 16


@pytest.fixture(scope="module")
def region() -> Config:
    return Config(REGION_MODULE)


def probe_timeout(region: Config, worker_class: str) -> float:
    """The readiness probe's timeout as the module computes it with its defaults."""
    defaults = {**region.defaults(), "worker_class": worker_class}
    app = region.resources[("azurerm_container_app", "this")]
    probe = app["template"][0]["container"][0]["readiness_probe"][0]
    return float(evaluate(probe["timeout"], defaults, region.locals))


@pytest.fixture
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Gunicorn]:
    worker_class, workers, threads = request.param
    catalog = write_catalog(
        tmp_path / "catalog.toml", {"slow": {"provider": "simulated", "latency_s": LATENCY_S}}
    )
    env = {
        "ES_CATALOG": str(catalog),
        "ES_API_KEYS": "dispatcher:k3y",
        "WEB_CONCURRENCY": str(workers),
        "GUNICORN_THREADS": str(threads),
        "GUNICORN_WORKER_CLASS": worker_class,
    }
    with Gunicorn(tmp_path, env) as running:
        yield running


def start_calls(port: int, n: int) -> list[http.client.HTTPConnection]:
    """n model calls, each on its own connection, connected (so queued) in order."""
    conns = []
    for i in range(n):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        body = json.dumps({"model": "slow", "prompt": f"call {i}"})
        headers = {"Content-Type": "application/json", "Authorization": "Bearer k3y"}
        conn.request("POST", "/execute", body=body, headers=headers)
        conns.append(conn)
    return conns


def ready_probe(port: int, timeout: float) -> tuple[int, float]:
    """GET /ready as the platform sends it (no key), and how long the answer took."""
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", "/ready")
        status = conn.getresponse().status
    finally:
        conn.close()
    return status, time.monotonic() - started


def finish(conns: list[http.client.HTTPConnection]) -> list[int]:
    statuses = []
    for conn in conns:
        response = conn.getresponse()
        response.read()
        statuses.append(response.status)
        conn.close()
    return statuses


@pytest.mark.parametrize("server", [("gthread", 2, 2)], indirect=True, ids=["gthread-2x2"])
def test_a_busy_gthread_replica_answers_its_probe_late_but_within_the_timeout(
    server: Gunicorn, region: Config
) -> None:
    calls = start_calls(server.port, 4)  # every thread of both workers runs a model call
    timeout = probe_timeout(region, "gthread")
    status, elapsed = ready_probe(server.port, timeout)
    assert status == 200
    # It waited for a call to end: the unfixed 3 s timeout would have failed this busy
    # replica, and two such failures took it out of rotation.
    assert elapsed > UNFIXED_TIMEOUT_S, f"/ready answered in {elapsed:.1f} s on a busy replica"
    assert elapsed < timeout
    assert finish(calls) == [200] * 4


@pytest.mark.parametrize("server", [("gevent", 2, 1)], indirect=True, ids=["gevent-2"])
def test_a_busy_gevent_replica_answers_its_probe_at_once(server: Gunicorn, region: Config) -> None:
    calls = start_calls(server.port, 16)
    status, elapsed = ready_probe(server.port, probe_timeout(region, "gevent"))
    assert status == 200
    assert elapsed < 1.0, f"/ready took {elapsed:.1f} s beside 16 calls under gevent"
    assert finish(calls) == [200] * 16
