r"""A model that only waits and fails on purpose: for tests, load tests and benchmarks.

Options (catalog keys):
    latency_s        fixed latency (default 0)
    latency_min_s,
    latency_max_s    uniform random latency instead of a fixed one
    tail_rate        heavy tail: this share of calls (0..1, drawn per call) takes
                     ``tail_latency_s`` instead (a straggler; default 0)
    tail_latency_s   a straggler's latency (default 10)
    tail_request_id  a regular expression: calls whose request id matches it take
                     ``tail_latency_s`` too (a straggler on purpose, for tests: the
                     dispatcher's request id is job.execution.call, so "[.]7[.]1$" is
                     execution 7's first call, and its hedge, call 2, is not slow)
    tail_prompt      with tail_request_id: only calls whose prompt (last message)
                     contains this text are stragglers ("[.]1$" and "q7:": the first
                     call of every question q7, whatever its execution id)
    error_rate       share of calls that fail, 0..1 (default 0)
    error_kind       timeout | 5xx | 429 | exception (default 5xx)
    status           the HTTP status a 5xx failure reports (default 503)
    retry_after_s    Retry-After a 429 reports (default 1)
    output           the answer; "{prompt}" is replaced by the last message (default echoes it)

Rate-limit mode (a real provider's limit, not random failures):
    rpm, tpm         requests and tokens per ``rate_window_s`` (either or both); beyond
                     them the call is refused at once with a 429, Retry-After (the time
                     until it would fit) and OpenAI's x-ratelimit-* values. A call costs
                     its prompt (characters / 4) plus max_tokens when admitted; its real
                     usage is settled after the answer (unused tokens come back)
    rate_window_s    the window of rpm and tpm (default 60; tests use a few seconds)
    rate_burst_s     the request bucket holds this many seconds' worth (default: the whole
                     window); 1 models a provider that enforces 300 rpm as 5 per second
    rate_state_file  a file that holds the bucket: every process naming it shares one
                     limit (a replica's gunicorn workers, as at a provider deployment);
                     without it each worker process has its own bucket
    rate_log         a file that gets one line per arrival, "<unix time> <1|0 admitted>
                     <tokens charged>", so tests and benchmarks count at "the provider"
"""

from __future__ import annotations

import math
import os
import random
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .base import (
    Call,
    Chunk,
    Completion,
    Provider,
    ProviderCancelled,
    ProviderFailure,
    ProviderRateLimited,
    ProviderRejected,
    ProviderTimeout,
)
from .ratelimit import TokenBucket

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
        self.tail_rate = float(options.get("tail_rate", 0.0))
        self.tail_latency_s = float(options.get("tail_latency_s", 10.0))
        tail_id = options.get("tail_request_id")
        self.tail_request_id = re.compile(str(tail_id)) if tail_id else None
        self.tail_prompt = str(options.get("tail_prompt", ""))
        if not 0.0 <= self.tail_rate <= 1.0 or self.tail_latency_s < 0:
            raise ValueError(
                f"simulated model {model!r}: tail_rate within 0..1, tail_latency_s >= 0"
            )
        rpm, tpm = options.get("rpm"), options.get("tpm")
        self.bucket: TokenBucket | None = None
        if rpm is not None or tpm is not None:
            state_file = options.get("rate_state_file")
            burst = options.get("rate_burst_s")
            try:
                self.bucket = TokenBucket(
                    None if rpm is None else int(rpm),
                    None if tpm is None else int(tpm),
                    float(options.get("rate_window_s", 60.0)),
                    state_file=Path(state_file) if state_file else None,
                    burst_s=None if burst is None else float(burst),
                )
            except (TypeError, ValueError) as exc:
                raise ValueError(f"simulated model {model!r}: bad rate limit: {exc}") from None
        log = options.get("rate_log")
        self.rate_log = Path(log) if log else None

    def _latency(self, request_id: str = "", prompt: str = "") -> float:
        if (
            self.tail_request_id is not None
            and self.tail_request_id.search(request_id)
            and self.tail_prompt in prompt
        ):
            return self.tail_latency_s
        if self.tail_rate > 0 and self._random.random() < self.tail_rate:
            return self.tail_latency_s
        if self.latency_max_s == self.latency_min_s:
            return self.latency_min_s
        return self._random.uniform(self.latency_min_s, self.latency_max_s)

    @staticmethod
    def estimated_tokens(call: Call) -> int:
        """What a call costs at admission: its prompt (characters / 4) plus max_tokens."""
        chars = sum(len(m["content"]) for m in call.messages)
        return math.ceil(chars / 4) + call.max_tokens

    def _log_arrival(self, admitted: bool, cost: int) -> None:
        if self.rate_log is None:
            return
        line = f"{time.time():.6f} {int(admitted)} {cost}\n".encode()
        fd = os.open(self.rate_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)  # one small O_APPEND write: whole lines across processes
        finally:
            os.close(fd)

    def _admit(self, call: Call) -> int:
        """Take the call's cost from the bucket, or raise the 429 a provider would."""
        assert self.bucket is not None
        cost = self.estimated_tokens(call)
        admission = self.bucket.acquire(cost)
        self._log_arrival(admission.admitted, cost)
        if admission.too_large:
            raise ProviderRejected(
                f"request of {cost} tokens is larger than the limit of "
                f"{self.bucket.tpm} tokens per {self.bucket.window_s:g} s"
            )
        if not admission.admitted:
            raise ProviderRateLimited(
                "simulated rate limit reached",
                retry_after_s=admission.retry_after_s,
                limits=admission.info,
            )
        return cost

    def complete(self, call: Call) -> Completion:
        charged = self._admit(call) if self.bucket is not None else 0
        completion = self._complete(call)
        if self.bucket is not None:
            self.bucket.settle(charged, completion.prompt_tokens + completion.completion_tokens)
        return completion

    def _complete(self, call: Call) -> Completion:
        fail = self.error_rate > 0 and self._random.random() < self.error_rate
        if fail and self.error_kind == "timeout":
            time.sleep(max(0.0, call.remaining()))
            raise ProviderTimeout("simulated timeout")
        latency = self._latency(call.request_id, call.messages[-1]["content"])
        if latency > call.remaining():
            time.sleep(max(0.0, call.remaining()))
            raise ProviderTimeout(f"simulated latency {latency:g} s exceeds the deadline")
        if latency > 0 and call.cancel.wait(latency):
            raise ProviderCancelled("the client went away")
        return self._answer(call, fail)

    def stream(self, call: Call) -> Iterator[Chunk]:
        """The answer word by word, the latency spread evenly over the words; a failure
        happens before the first word, a timeout at the deadline."""
        charged = self._admit(call) if self.bucket is not None else 0
        fail = self.error_rate > 0 and self._random.random() < self.error_rate
        if fail and self.error_kind == "timeout":
            time.sleep(max(0.0, call.remaining()))
            raise ProviderTimeout("simulated timeout")
        completion = self._answer(call, fail)
        words = completion.output.split(" ")
        pause = self._latency(call.request_id, call.messages[-1]["content"]) / len(words)
        for i, word in enumerate(words):
            if pause > call.remaining():
                time.sleep(max(0.0, call.remaining()))
                raise ProviderTimeout(f"simulated stream passed the deadline after {i} words")
            if pause > 0:
                time.sleep(pause)
            yield Chunk(text=word if i == 0 else " " + word)
        if self.bucket is not None:
            self.bucket.settle(charged, completion.prompt_tokens + completion.completion_tokens)
        yield Chunk(
            finish_reason=completion.finish_reason,
            prompt_tokens=completion.prompt_tokens,
            completion_tokens=completion.completion_tokens,
        )

    def _answer(self, call: Call, fail: bool) -> Completion:
        if fail:
            if self.error_kind == "429":
                raise ProviderRateLimited("simulated rate limit", retry_after_s=self.retry_after_s)
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
