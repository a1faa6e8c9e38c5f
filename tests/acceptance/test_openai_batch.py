"""The OpenAI Batch API end to end: the official ``openai`` client and the CLI against the
real ``executor-service dispatcher`` (SQLite) fanning a batch file out to two real gunicorn
executors (regions eu and us): files -> batches -> poll -> output file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from dispatcher_harness import KEYS, DispatcherProcess, executor, write_regions
from support import REPO, Gunicorn, wait_until

pytestmark = pytest.mark.slow

MODELS = {"sim": {"provider": "simulated", "latency_s": 0.01}}
QUESTIONS = {"capital": "What is the capital of France?", "sum": "What is 2+2?"}


@pytest.fixture(scope="module")
def regions(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Gunicorn]]:
    tmp = tmp_path_factory.mktemp("batch-executors")
    with executor(tmp, "eu", MODELS) as eu, executor(tmp, "us", MODELS) as us:
        yield {"eu": eu, "us": us}


@pytest.fixture(scope="module")
def dispatcher(
    regions: dict[str, Gunicorn], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DispatcherProcess]:
    tmp = tmp_path_factory.mktemp("batch-dispatcher")
    regions_file = write_regions(
        tmp / "regions.toml", {name: (ex.url, 4, ["sim"]) for name, ex in regions.items()}
    )
    with DispatcherProcess(tmp, f"sqlite:///{tmp / 'dispatcher.db'}", regions_file) as process:
        yield process


@pytest.fixture(scope="module")
def client(dispatcher: DispatcherProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=dispatcher.url + "/v1", api_key=KEYS["alice"], max_retries=0
    ) as client:
        yield client


def batch_file(path: Path, lines: list[Any]) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def request(custom_id: str, content: str) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": "sim",
            "messages": [{"role": "user", "content": content}],
            "temperature": 0,
            "max_tokens": 32,
        },
    }


def test_files_batches_poll_output_across_regions(client: openai.OpenAI, tmp_path: Path) -> None:
    path = batch_file(tmp_path / "batch.jsonl", [request(k, v) for k, v in QUESTIONS.items()])
    with path.open("rb") as handle:
        uploaded = client.files.create(file=handle, purpose="batch")
    assert uploaded.purpose == "batch" and uploaded.bytes == path.stat().st_size
    batch = client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"regions": "eu,us", "experiment": "capitals"},
    )
    assert batch.status == "in_progress"
    assert batch.request_counts is not None and batch.request_counts.total == 4

    def finished() -> Any:
        current = client.batches.retrieve(batch.id)
        return current if current.status in {"completed", "failed", "cancelled"} else None

    done = wait_until(finished, timeout=60, interval=0.2, what="the batch to complete")
    assert done.status == "completed"
    assert done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (4, 0)
    assert done.error_file_id is None and done.output_file_id
    assert done.metadata == {"regions": "eu,us", "experiment": "capitals"}

    lines = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
    got = {(line["custom_id"], line["region"]): line for line in lines}
    assert set(got) == {(k, r) for k in QUESTIONS for r in ("eu", "us")}
    for (custom_id, region), line in got.items():
        assert line["executed_region"] == region  # failover none: never another region
        assert line["error"] is None
        response = line["response"]
        assert response["status_code"] == 200 and response["request_id"]
        body = response["body"]
        assert body["object"] == "chat.completion" and body["model"] == "sim"
        answer = body["choices"][0]["message"]["content"]
        assert answer == f"simulated answer to: {QUESTIONS[custom_id]}"
        assert body["executor"]["region"] == region  # the executor that answered
    assert done.id in {b.id for b in client.batches.list(limit=100)}
    assert client.files.retrieve(done.output_file_id).purpose == "batch_output"


def test_a_bad_file_fails_validation_with_line_numbers(
    client: openai.OpenAI, tmp_path: Path
) -> None:
    lines = [request("a", "x"), request("a", "y"), "{oops", {**request("b", "z"), "url": "/v1/x"}]
    with batch_file(tmp_path / "bad.jsonl", lines).open("rb") as handle:
        uploaded = client.files.create(file=handle, purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert batch.status == "failed"
    assert batch.errors is not None and batch.errors.data is not None
    assert [(e.code, e.line) for e in batch.errors.data] == [
        ("duplicate_custom_id", 2),
        ("invalid_json_line", 3),
        ("mismatched_endpoint", 4),
    ]


def test_errors_are_the_clients_exception_classes(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")
    with pytest.raises(openai.UnprocessableEntityError) as info:
        client.batches.create(
            input_file_id="file-x", endpoint="/v1/embeddings", completion_window="24h"
        )
    assert info.value.param == "endpoint"


def cli(dispatcher: DispatcherProcess, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "ES_DISPATCHER_URL": dispatcher.url,
        "ES_DISPATCHER_KEY": KEYS["alice"],
        "COLUMNS": "200",
    }
    return subprocess.run(
        [sys.executable, "-m", "executor_service.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_cli_submits_a_batch_file_and_prints_openai_batch_results(
    dispatcher: DispatcherProcess, tmp_path: Path
) -> None:
    path = batch_file(tmp_path / "cli.jsonl", [request(k, v) for k, v in QUESTIONS.items()])
    submitted = cli(dispatcher, "submit", str(path), "--regions", "us", "--follow")
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    batch_id = submitted.stdout.split()[1].rstrip(":")
    assert batch_id.startswith("batch_")
    assert "completed: 2 completed, 0 failed of 2" in submitted.stdout
    shown = cli(dispatcher, "results", batch_id, "--format", "openai-batch")
    assert shown.returncode == 0, shown.stderr
    lines = [json.loads(x) for x in shown.stdout.splitlines()]
    assert sorted((x["custom_id"], x["region"]) for x in lines) == [
        ("capital", "us"),
        ("sum", "us"),
    ]

    bad = cli(dispatcher, "submit", str(batch_file(tmp_path / "bad.jsonl", ["{"])))
    assert bad.returncode == 1
    assert "line 1: invalid_json_line" in bad.stdout
