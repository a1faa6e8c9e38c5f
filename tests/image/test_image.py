"""The executor image, built by ``make image`` from the repository's Dockerfile and run
here with buildah: its own CMD serves the real SmolLM2 model, its HEALTHCHECK passes,
scripts/smoke.sh passes against it, /metrics counts the calls, it runs as the non-root
user, SIGTERM lets a call in flight finish, and the dispatcher's command (as Terraform
runs it) starts from the same image and runs a job through the executor.

The first test builds the image through ``make image`` (minutes from scratch, seconds
with buildah's layer cache). Where buildah cannot run at all, every test here is
skipped with the reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest
import requests
from buildah import (
    Container,
    ImageConfig,
    main_process,
    processes_running,
    uids,
    why_buildah_cannot_run,
    why_buildah_failed,
)
from prometheus_client.parser import text_string_to_metric_families
from psycopg import sql
from support import REPO, free_port, wait_until

# A tag of this checkout's own: two worktrees testing at once on one machine do not run
# each other's image (they share buildah's layer cache all the same).
IMAGE = os.environ.get(
    "ES_IMAGE",
    f"localhost/executor-service:test-{hashlib.sha1(str(REPO).encode()).hexdigest()[:8]}",
)
MODEL = "smollm2-135m"
# A from-scratch build (debootstrap, apt, the llama-cpp-python compile) took 9 min 33 s
# on 2 shared cores (up to 12 min when they are busy); a cached one takes seconds.
BUILD_TIMEOUT_S = 45 * 60
EXECUTOR_KEY = "image-test-executor-key"
CLIENT_KEY = "image-test-client-key"
POSTGRES_URL = os.environ.get("ES_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")

pytestmark = [pytest.mark.image, pytest.mark.slow, pytest.mark.timeout(BUILD_TIMEOUT_S + 600)]


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> ImageConfig:
    """The image, built (or found up to date in the layer cache) by `make image`."""
    reason = why_buildah_cannot_run()
    if reason:
        pytest.skip(f"the image is not built or run here: {reason}")
    log = tmp_path_factory.mktemp("image") / "make-image.log"
    with log.open("wb") as out:
        done = subprocess.run(
            ["make", "--no-print-directory", "image"],
            cwd=REPO,
            env={**os.environ, "ES_IMAGE": IMAGE},
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=BUILD_TIMEOUT_S,
        )
    output = log.read_text(errors="replace")
    if done.returncode != 0:
        reason = why_buildah_failed()
        if reason:
            pytest.skip(f"the image is not built or run here: {reason}")
        pytest.fail(f"make image failed ({done.returncode}):\n{output[-6000:]}")
    print(output.splitlines()[-1])  # "== IMAGE: SIZE, built in N s"
    return ImageConfig.of(IMAGE)


@dataclass
class Served:
    """The image's CMD running in a container, on a loopback port."""

    container: Container
    runner: subprocess.Popen[bytes]
    url: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def healthcheck(self, image: ImageConfig) -> subprocess.CompletedProcess[str]:
        # The platform runs the check inside the container, with its environment.
        return self.container.run(image.healthcheck, timeout=image.health_timeout_s + 30)

    def terminate(self) -> None:
        """SIGTERM to the container's main process (gunicorn), as a platform stops it."""
        main = main_process(self.runner, "gunicorn")
        if main is not None and self.runner.poll() is None:
            os.kill(main, signal.SIGTERM)

    def stop(self, timeout: float = 60) -> int:
        self.terminate()
        try:
            return self.runner.wait(timeout)
        except subprocess.TimeoutExpired:
            self.runner.kill()
            self.runner.wait(10)
            raise


def serve(image: ImageConfig, tmp: Path, **env: str) -> Served:
    """Start the image's own CMD; return once its HEALTHCHECK command passes."""
    port = free_port()
    # Loopback only (the container shares the host's network), with an API key as
    # in Azure; everything else is the image's own configuration.
    container = Container(
        IMAGE,
        env={
            "PORT": str(port),
            "HOST": "127.0.0.1",
            "ES_API_KEYS": f"dispatcher:{EXECUTOR_KEY}",
            "ES_REGION": "image-test",
            **env,
        },
    )
    log = tmp / f"executor-{port}.log"
    runner = container.start(image.cmd, log)
    served = Served(container, runner, f"http://127.0.0.1:{port}", log)

    def healthy() -> bool:
        if runner.poll() is not None:
            raise AssertionError(f"the image's CMD exited {runner.returncode}:\n{served.output()}")
        return served.healthcheck(image).returncode == 0

    # As long as the platform would wait before calling it unhealthy.
    patience = image.health_start_period_s + image.health_retries * image.health_interval_s
    try:
        wait_until(healthy, patience, interval=0.5, what="the image's HEALTHCHECK to pass")
    except BaseException:
        served.runner.kill()
        served.runner.wait(10)
        container.remove()
        raise
    return served


@pytest.fixture(scope="module")
def executor(image: ImageConfig, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    served = serve(image, tmp_path_factory.mktemp("executor"))
    try:
        yield served
    finally:
        served.stop()
        served.container.remove()


def auth(key: str = EXECUTOR_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def requests_by_status(url: str) -> dict[str, float]:
    """executor_requests_total summed over models, by HTTP status, from GET /metrics."""
    response = requests.get(url + "/metrics", headers=auth(), timeout=10)
    assert response.status_code == 200, response.text
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == "executor_requests_total":
                status = sample.labels["status"]
                counts[status] = counts.get(status, 0) + sample.value
    return counts


def in_flight(url: str) -> float:
    response = requests.get(url + "/metrics", headers=auth(), timeout=10)
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == "executor_in_flight":
                return sample.value
    return 0.0


# ---------------------------------------------------------------------- tests ---


def test_healthcheck_passes_and_the_cmd_serves_the_embedded_model(
    image: ImageConfig, executor: Served
) -> None:
    assert image.cmd == ["gunicorn", "--config", "gunicorn.conf.py", "wsgi:app"]
    assert executor.healthcheck(image).returncode == 0
    models = requests.get(executor.url + "/models", headers=auth(), timeout=10)
    assert models.status_code == 200
    assert MODEL in json.dumps(models.json())
    assert requests.get(executor.url + "/ready", timeout=10).status_code == 200
    assert requests.get(executor.url + "/models", timeout=10).status_code == 401
    # gunicorn and the app started without an error (e.g. a path the user cannot write).
    errors = [line for line in executor.output().splitlines() if "[ERROR]" in line]
    assert errors == []


def test_smoke_script_passes_against_the_image(executor: Served) -> None:
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "smoke.sh"), executor.url, EXECUTOR_KEY],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_metrics_count_the_calls(executor: Served) -> None:
    before = requests_by_status(executor.url)
    answer = requests.post(
        executor.url + "/execute",
        json={"model": MODEL, "prompt": "Name a colour.", "max_tokens": 16},
        headers=auth(),
        timeout=120,
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["provider"] == "llama_cpp" and body["region"] == "image-test"
    assert body["output"].strip() and body["usage"]["completion_tokens"] > 0
    bad = requests.post(
        executor.url + "/execute",
        json={"model": MODEL, "max_tokens": 0},
        headers=auth(),
        timeout=30,
    )
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "validation_error"

    after = requests_by_status(executor.url)
    assert after.get("200", 0) - before.get("200", 0) == 1
    assert after.get("422", 0) - before.get("422", 0) == 1


def test_gunicorn_and_its_workers_run_as_the_non_root_user(
    image: ImageConfig, executor: Served
) -> None:
    uid = int(image.user.split(":")[0])
    assert uid >= 1000
    pids = processes_running(executor.runner, "gunicorn")
    master = main_process(executor.runner, "gunicorn")
    assert master is not None, "no gunicorn process under buildah run"
    workers = [pid for pid in pids if pid != master]
    assert len(workers) == 4, "gunicorn.conf.py's default: 4 workers"
    for pid in pids:
        assert uids(pid) == (uid, uid), f"process {pid} runs as {uids(pid)}"


def test_the_image_has_no_compiler(executor: Served) -> None:
    found = executor.container.run(["sh", "-c", "command -v gcc cc c++ cmake make"])
    assert found.returncode != 0 and found.stdout.strip() == "", found.stdout
    # ...yet the llama.cpp compiled in the builder stage is there and loads.
    loaded = executor.container.run(["python", "-c", "import llama_cpp; print('ok')"])
    assert loaded.returncode == 0 and loaded.stdout.strip() == "ok", loaded.stderr


# --------------------------------------------------------------- the dispatcher ---


def terraform_dispatcher_command() -> list[str]:
    """The default command of the Terraform dispatcher module."""
    import hcl2
    from hcl2.utils import SerializationOptions

    options = SerializationOptions(
        strip_string_quotes=True, with_comments=False, explicit_blocks=False
    )
    text = (REPO / "terraform" / "modules" / "dispatcher" / "variables.tf").read_text()
    variables = hcl2.loads(text, serialization_options=options)["variable"]
    for variable in variables:
        if "command" in variable:
            return [str(part) for part in variable["command"]["default"]]
    raise AssertionError("the dispatcher module has no variable 'command'")


def with_option(command: list[str], option: str, value: str) -> list[str]:
    assert option in command, f"{option} is in the command Terraform runs: {command}"
    i = command.index(option)
    return [*command[: i + 1], value, *command[i + 2 :]]


@pytest.fixture
def database() -> Iterator[str]:
    name = f"es_image_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield urlsplit(POSTGRES_URL)._replace(path="/" + name).geturl()
    finally:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.mark.postgres
def test_dispatcher_command_from_the_image_runs_a_job_through_the_executor(
    executor: Served, database: str, tmp_path: Path
) -> None:
    port = free_port()
    # Terraform's command, on loopback and a free port instead of 0.0.0.0:8100.
    command = with_option(terraform_dispatcher_command(), "--host", "127.0.0.1")
    command = with_option(command, "--port", str(port))
    config = tmp_path / "config"
    config.mkdir()
    (config / "regions.toml").write_text(
        f'[regions.image-test]\nurl = "{executor.url}"\nconcurrency = 2\n'
        f'models = ["{MODEL}"]\napi_key_env = "ES_REGION_IMAGE_TEST_KEY"\n'
    )
    # The environment the Terraform module gives it (PostgreSQL, regions file, keys).
    container = Container(
        IMAGE,
        env={
            "ES_DATABASE_URL": database,
            "ES_REGIONS_FILE": "/etc/executor-service/regions.toml",
            "ES_API_KEYS": f"clients:{CLIENT_KEY}",
            "ES_REGION_IMAGE_TEST_KEY": EXECUTOR_KEY,
            "ES_LOG_FORMAT": "json",
            "ES_SHUTDOWN_GRACE_S": "10",
        },
        volumes={config: "/etc/executor-service"},
    )
    log = tmp_path / "dispatcher.log"
    runner = container.start(command, log)
    url = f"http://127.0.0.1:{port}"
    try:

        def answering() -> bool:
            assert runner.poll() is None, log.read_text(errors="replace")
            return requests.get(url + "/health", timeout=2).status_code == 200

        wait_until(answering, 90, interval=0.5, what="the dispatcher's /health")
        job = requests.post(
            url + "/jobs",
            json={"questions": ["What is 2 + 2?"], "models": [MODEL], "params": {"max_tokens": 16}},
            headers=auth(CLIENT_KEY),
            timeout=30,
        )
        assert job.status_code == 201, job.text
        job_id = job.json()["id"]

        def finished() -> dict[str, Any] | None:
            view = requests.get(f"{url}/jobs/{job_id}", headers=auth(CLIENT_KEY), timeout=10)
            body: dict[str, Any] = view.json()
            return body if body["state"] in {"finished", "cancelled"} else None

        wait_until(finished, 180, interval=0.5, what=f"job {job_id} to finish")
        results = requests.get(f"{url}/jobs/{job_id}/results", headers=auth(CLIENT_KEY), timeout=10)
        assert results.status_code == 200, results.text
        executions = results.json()["executions"]
        assert [e["state"] for e in executions] == ["succeeded"], executions
        assert executions[0]["executed_region"] == "image-test"
        assert executions[0]["output"].strip()
    finally:
        main = main_process(runner, "executor-service")
        if main is not None:
            os.kill(main, signal.SIGTERM)
        try:
            code = runner.wait(60)
        except subprocess.TimeoutExpired:
            runner.kill()
            runner.wait(10)
            raise
        finally:
            container.remove()
    assert code == 0, log.read_text(errors="replace")


# ------------------------------------------------------------------- shutdown ---


def test_sigterm_lets_the_call_in_flight_finish_and_exits_0(
    image: ImageConfig, tmp_path: Path
) -> None:
    served = serve(image, tmp_path, WEB_CONCURRENCY="1")
    try:
        max_tokens = 300
        answer: dict[str, Any] = {}

        def call() -> None:
            response = requests.post(
                served.url + "/execute",
                json={
                    "model": MODEL,
                    "prompt": "Write a very long story about a cat who travels the world.",
                    "max_tokens": max_tokens,
                },
                headers=auth(),
                timeout=120,
            )
            answer.update(status=response.status_code, body=response.json())

        caller = threading.Thread(target=call)
        caller.start()
        wait_until(lambda: in_flight(served.url) >= 1, 30, what="the call to be in flight")
        assert caller.is_alive(), "the call is still waiting for its answer"
        served.terminate()
        code = served.runner.wait(90)
        caller.join(120)
        # The whole answer, not a cut one: the model's own end or max_tokens (which of the
        # two depends on the build's CPU flags: greedy decoding is not bit-identical).
        assert answer["status"] == 200, answer
        assert answer["body"]["finish_reason"] in {"stop", "length"}, answer
        assert answer["body"]["output"].strip()
        print("in flight at SIGTERM, then answered:", answer["body"]["usage"])
        assert code == 0, served.output()
        assert "Handling signal: term" in served.output()
    finally:
        if served.runner.poll() is None:
            served.runner.kill()
            served.runner.wait(10)
        served.container.remove()
