"""`executor-service serve` with no configuration at all answers with the embedded model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from support import free_port, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.model]


def test_serve_without_configuration_answers_with_smollm2(tmp_path: Path) -> None:
    port = free_port()
    cli = Path(sys.executable).parent / "executor-service"
    # no ES_* variables: the packaged catalog, open on loopback
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ES_", "PROMETHEUS_"))}
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(
        [str(cli), "serve", "--port", str(port), "--workers", "1"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: requests.get(url + "/ready", timeout=5).ok, 90, what="serve to be ready")
        models = requests.get(url + "/models", timeout=5).json()
        assert [m["name"] for m in models["models"]] == ["smollm2-135m"]
        r = requests.post(
            url + "/execute",
            json={"model": "smollm2-135m", "prompt": "What is 2+2?", "max_tokens": 48},
            timeout=120,
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["provider"] == "llama_cpp"
        assert body["output"].strip()
        assert body["usage"]["prompt_tokens"] > 0
        assert body["usage"]["completion_tokens"] > 0
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        log.close()
