"""The E1 baseline: a bare Flask JSON endpoint, served by the same gunicorn config as the executor.

``POST /execute`` parses the JSON body and answers a JSON object of the same shape
and about the same size as the executor's 200, with no validation, auth, admission,
metrics or logging: what is left is Flask, Werkzeug and gunicorn, the floor under
which the executor cannot go.

    gunicorn -c python:executor_service.gunicorn_config 'bench.bare_app:app'
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from flask import Flask, jsonify, request
from flask.typing import ResponseReturnValue

app = Flask(__name__)


@app.post("/execute")
def execute() -> ResponseReturnValue:
    """Echo the prompt in an executor-shaped answer."""
    started = time.monotonic()
    body: dict[str, Any] = request.get_json(force=True)
    prompt = str(body.get("prompt", ""))
    finished = time.monotonic()
    return jsonify(
        {
            "request_id": body.get("request_id") or uuid.uuid4().hex,
            "model": body.get("model"),
            "provider": "bare",
            "region": "bench",
            "replica": "bench",
            "output": "simulated answer to: " + prompt[:200],
            "finish_reason": "stop",
            "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": 5},
            "timing": {
                "queue_ms": 0.0,
                "model_ms": 0.0,
                "total_ms": round((finished - started) * 1000, 3),
            },
        }
    )


@app.get("/ready")
def ready() -> ResponseReturnValue:
    return jsonify({"status": "ready"})


@app.get("/metrics")
def metrics() -> ResponseReturnValue:
    """An empty exposition, so the same load generator options work on both apps."""
    return "", 200, {"Content-Type": "text/plain; version=0.0.4"}
