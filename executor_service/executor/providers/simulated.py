"""A model that only waits and fails on purpose: for tests, load tests and benchmarks.

Options (catalog keys):
    latency_s        fixed latency (default 0)
    latency_min_s,
    latency_max_s    uniform random latency instead of a fixed one
    error_rate       share of calls that fail, 0..1 (default 0)
    error_kind       timeout | 5xx | 429 | exception (default 5xx)
    status           the HTTP status a 5xx failure reports (default 503)
    retry_after_s    Retry-After a 429 reports (default 1)
    output           the answer; "{prompt}" is replaced by the last message (default echoes it)
"""

from __future__ import annotations

import random
import time
from typing import Any

from .base import Call, Completion, Provider, ProviderFailure, ProviderTimeout

ERROR_KINDS = ("timeout", "5xx", "429", "exception")


class SimulatedProvider(Provider):
    kind = "simulated"

    def __init__(self, model: str, options: dict[str, Any]) -> None:
        super().__init__(model, options)
        self.latency_s = float(options.get("latency_s", 0.0))
        self.latency_min_s = float(options.get("latency_min_s", self.latency_s))
        self.latency_max_s = float(options.get("latency_max_s", self.latency_s))
        self.error_rate = float(options.get("error_rate", 0.0))
        self.error_kind = str(options.get("error_kind", "5xx"))
        self.status = int(options.get("status", 503))
        self.retry_after_s = float(options.get("retry_after_s", 1.0))
        self.output = str(options.get("output", "simulated answer to: {prompt}"))
        if self.error_kind not in ERROR_KINDS:
            raise ValueError(f"simulated model {model!r}: error_kind must be one of {ERROR_KINDS}")
        if not 0.0 <= self.error_rate <= 1.0:
            raise ValueError(f"simulated model {model!r}: error_rate must be within 0..1")
        if self.latency_min_s < 0 or self.latency_max_s < self.latency_min_s:
            raise ValueError(f"simulated model {model!r}: bad latency range")
        self._random = random.Random(options.get("random_seed"))

    def _latency(self) -> float:
        if self.latency_max_s == self.latency_min_s:
            return self.latency_min_s
        return self._random.uniform(self.latency_min_s, self.latency_max_s)

    def complete(self, call: Call) -> Completion:
        fail = self.error_rate > 0 and self._random.random() < self.error_rate
        if fail and self.error_kind == "timeout":
            time.sleep(max(0.0, call.remaining()))
            raise ProviderTimeout("simulated timeout")
        latency = self._latency()
        if latency > call.remaining():
            time.sleep(max(0.0, call.remaining()))
            raise ProviderTimeout(f"simulated latency {latency:g} s exceeds the deadline")
        if latency > 0:
            time.sleep(latency)
        if fail:
            if self.error_kind == "429":
                raise ProviderFailure(
                    "simulated rate limit", status=429, retry_after_s=self.retry_after_s
                )
            if self.error_kind == "exception":
                raise RuntimeError("simulated unexpected provider exception")
            raise ProviderFailure("simulated upstream error", status=self.status)
        prompt = call.messages[-1]["content"]
        output = self.output.replace("{prompt}", prompt[:200])
        return Completion(
            output=output,
            finish_reason="stop",
            prompt_tokens=sum(len(m["content"].split()) for m in call.messages),
            completion_tokens=len(output.split()),
        )
