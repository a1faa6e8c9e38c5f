"""The llama.cpp provider under gevent, in a monkey-patched interpreter of its own (a
subprocess, hence this tier): the model call runs in gevent's native thread pool, so
the event loop keeps ticking, and calls stay exclusive. The model is a fake."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from support import REPO


@pytest.fixture
def gguf(tmp_path: Path) -> str:
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"GGUF")
    return str(path)


GEVENT_SCRIPT = textwrap.dedent(
    """
    from gevent import monkey

    monkey.patch_all()

    import json
    import sys
    import time

    import gevent

    from executor_service.executor.providers import Call, ProviderTimeout
    from executor_service.executor.providers.llama_cpp import LlamaCppProvider

    real_sleep = monkey.get_original("time", "sleep")
    real_lock = monkey.get_original("threading", "Lock")


    class BlockingFake:
        # Blocks its native thread like a llama.cpp call (the real, unpatched sleep).
        def __init__(self, **kwargs):
            self.deadline = None
            self.deadline_hit = False
            self.active = 0
            self.max_active = 0
            self.calls = 0
            self.counter_lock = real_lock()

        def reset(self):
            pass

        def create_chat_completion(self, **kwargs):
            with self.counter_lock:
                self.active += 1
                self.calls += 1
                self.max_active = max(self.max_active, self.active)
            try:
                for _ in range(kwargs["max_tokens"]):
                    real_sleep(0.01)
            finally:
                with self.counter_lock:
                    self.active -= 1
            n = kwargs["max_tokens"]
            return {
                "choices": [{"message": {"content": "ok"}, "finish_reason": "length"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": n},
            }


    fake = BlockingFake()
    provider = LlamaCppProvider("fake", {"gguf": sys.argv[1]}, llama_factory=lambda **kw: fake)
    provider.load()
    out = {}

    def deadline(s):
        return time.monotonic() + s

    def call(tokens, timeout_s=10.0):
        messages = [{"role": "user", "content": "hi"}]
        return Call(messages=messages, max_tokens=tokens, deadline=deadline(timeout_s))

    # 1. Other greenlets run while the model computes.
    ticks = [0]
    def ticker():
        while True:
            ticks[0] += 1
            gevent.sleep(0.005)
    t = gevent.spawn(ticker)
    gevent.sleep(0)
    before = ticks[0]
    provider.complete(call(30))
    out["ticks_during_call"] = ticks[0] - before
    t.kill()

    # 2. While one call runs, a call with a short deadline times out waiting for the model.
    long = gevent.spawn(provider.complete, call(30))
    end = deadline(5)
    while fake.active == 0 and time.monotonic() < end:
        gevent.sleep(0.001)
    try:
        provider.complete(call(1, timeout_s=0.05))
        out["busy"] = "answered"
    except ProviderTimeout:
        out["busy"] = "timeout"
    long.join()
    out["long_ok"] = long.successful()

    # 3. A greenlet killed mid-call keeps the model locked until the native call ends.
    victim = gevent.spawn(provider.complete, call(30))
    end = deadline(5)
    while fake.active == 0 and time.monotonic() < end:
        gevent.sleep(0.001)
    victim.kill()
    after = provider.complete(call(2))
    out["after_kill"] = after.completion_tokens
    out["max_active"] = fake.max_active
    out["calls"] = fake.calls
    print(json.dumps(out))
    """
)


def test_under_gevent_the_call_runs_in_the_thread_pool_and_stays_exclusive(gguf: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", GEVENT_SCRIPT, gguf],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["ticks_during_call"] > 0, "the event loop was blocked during the model call"
    assert out["busy"] == "timeout"
    assert out["long_ok"] is True
    assert out["after_kill"] == 2
    assert out["max_active"] == 1, "two calls ran in the model at once"
    assert out["calls"] == 4
