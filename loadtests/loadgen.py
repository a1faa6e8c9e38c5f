"""A small closed-loop HTTP load generator (gevent + geventhttpclient), wrk-style.

Why not locust for the capacity study and the benchmarks: on a 2-core machine the
load generator shares the CPU with the server, so it must cost as little per
request as possible, and the figures it reports must be exact. Locust rounds
response times above 1 s to 100 ms (too coarse for "p99 <= 1.25 s") and spends
CPU on its stats and event machinery. This client keeps N keep-alive connections
busy, each sending the same prepared request as soon as the previous answer
arrives, records every latency exactly, honours Retry-After on 503 the way a
well-behaved caller (the dispatcher) does, and reports its own CPU use so a
reader can tell whether it was the bottleneck. The locustfile stays the tool for
pass/fail load tests with a realistic request mix.

Run as a separate process (it monkeypatches nothing, but it is single-threaded
gevent and must not share a core's time slices with the script that drives it):

    python loadtests/loadgen.py --url http://127.0.0.1:8000/execute \\
        --body '{"model": "sim-1s", "prompt": "hi"}' --concurrency 400 --duration 20

It prints one JSON object (see ``summarise``) on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import sys
import time
from collections import Counter
from typing import Any
from urllib.parse import urlsplit

import gevent
from geventhttpclient import HTTPClient

# Sampling the in-flight gauge more often than this would itself load the server.
METRICS_INTERVAL_S = 0.25


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100) by nearest rank; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def summarise(latencies: list[float]) -> dict[str, float | None]:
    """count, mean, p50, p95, p99, max of latencies in seconds."""
    return {
        "count": len(latencies),
        "mean": sum(latencies) / len(latencies) if latencies else None,
        "p50": percentile(latencies, 50),
        "p95": percentile(latencies, 95),
        "p99": percentile(latencies, 99),
        "max": max(latencies) if latencies else None,
    }


class Run:
    """One closed-loop run: ``concurrency`` connections for ``warmup + duration`` seconds."""

    def __init__(self, args: argparse.Namespace) -> None:
        parts = urlsplit(args.url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.path = parts.path or "/"
        self.body = args.body.encode()
        self.method = "POST" if args.body else "GET"
        self.headers = {"Content-Type": "application/json"}
        for header in args.header:
            name, _, value = header.partition(":")
            self.headers[name.strip()] = value.strip()
        self.args = args
        self.statuses: Counter[int] = Counter()
        self.errors: Counter[str] = Counter()
        self.latency: dict[str, list[float]] = {"ok": [], "503": [], "other": []}
        self.hangs = 0
        self.in_flight_samples: list[float] = []
        self.started = self.window_start = self.window_end = 0.0

    def _client(self) -> HTTPClient:
        return HTTPClient(
            self.host,
            self.port,
            concurrency=1,
            connection_timeout=self.args.timeout,
            network_timeout=self.args.timeout,
        )

    def _record(self, started: float, elapsed: float, status: int | None, error: str) -> None:
        # A request counts when it started inside the measurement window.
        if not self.window_start <= started < self.window_end:
            return
        if status is None:
            self.errors[error] += 1
            if "timeout" in error.lower():
                self.hangs += 1
            return
        self.statuses[status] += 1
        key = "ok" if 200 <= status < 300 else "503" if status == 503 else "other"
        self.latency[key].append(elapsed)

    def _connection(self) -> None:
        client = self._client()
        while True:
            started = time.monotonic()
            if started >= self.window_end:
                break
            try:
                response = client.request(self.method, self.path, self.body, self.headers)
                response.read()
                status, retry_after = response.status_code, response.get("retry-after")
                response.release()
            except Exception as exc:  # a refused, reset or timed-out connection
                self._record(started, time.monotonic() - started, None, type(exc).__name__)
                client.close()
                client = self._client()
                gevent.sleep(0.05)  # do not spin on a dead server
                continue
            self._record(started, time.monotonic() - started, status, "")
            if status == 503 and self.args.honour_retry_after and retry_after:
                with contextlib.suppress(ValueError):
                    gevent.sleep(min(float(str(retry_after)), self.args.max_retry_after))
        client.close()

    def _sample_in_flight(self) -> None:
        parts = urlsplit(self.args.metrics_url)
        client = HTTPClient(parts.hostname, parts.port, network_timeout=self.args.timeout)
        auth = {k: v for k, v in self.headers.items() if k.lower() == "authorization"}
        while time.monotonic() < self.window_end:
            try:
                response = client.get(parts.path or "/metrics", headers=auth)
                text = response.read().decode()
            except Exception:
                gevent.sleep(METRICS_INTERVAL_S)
                continue
            if self.window_start <= time.monotonic():
                for line in text.splitlines():
                    if line.startswith(self.args.metric + " "):
                        self.in_flight_samples.append(float(line.split()[1]))
            gevent.sleep(METRICS_INTERVAL_S)
        client.close()

    def run(self) -> dict[str, Any]:
        self.started = time.monotonic()
        # Connections open over --ramp seconds (so a fixed-latency model does not see
        # every client in lock-step), then --warmup seconds pass unmeasured.
        self.window_start = self.started + self.args.ramp + self.args.warmup
        self.window_end = self.window_start + self.args.duration
        cpu_before = resource.getrusage(resource.RUSAGE_SELF)
        greenlets = []
        for _ in range(self.args.concurrency):
            greenlets.append(gevent.spawn(self._connection))
            if self.args.ramp:
                gevent.sleep(self.args.ramp / self.args.concurrency)
        if self.args.metrics_url:
            greenlets.append(gevent.spawn(self._sample_in_flight))
        # Requests in flight at the end of the window get up to --timeout to finish.
        gevent.joinall(greenlets, timeout=self.window_end - time.monotonic() + self.args.timeout)
        still_running = sum(1 for g in greenlets if not g.dead)
        gevent.killall(greenlets, block=False)
        cpu_after = resource.getrusage(resource.RUSAGE_SELF)
        cpu_s = (cpu_after.ru_utime - cpu_before.ru_utime) + (
            cpu_after.ru_stime - cpu_before.ru_stime
        )
        wall = time.monotonic() - self.started
        ok = self.latency["ok"]
        return {
            "concurrency": self.args.concurrency,
            "duration_s": self.args.duration,
            "requests": sum(self.statuses.values()) + sum(self.errors.values()),
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "errors": dict(self.errors),
            "hangs": self.hangs + still_running,
            "ok_per_s": len(ok) / self.args.duration,
            "overloaded_per_s": len(self.latency["503"]) / self.args.duration,
            "latency_ok_s": summarise(ok),
            "latency_503_s": summarise(self.latency["503"]),
            "latency_other_s": summarise(self.latency["other"]),
            "in_flight_server": summarise(self.in_flight_samples),
            # Little's law: what was in flight on average, seen from the client.
            "in_flight_little": (len(ok) / self.args.duration) * (sum(ok) / len(ok)) if ok else 0,
            "client_cpu_share": round(cpu_s / wall, 3),
        }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="full URL, e.g. http://127.0.0.1:8000/execute")
    parser.add_argument("--body", default="", help="JSON body (POST); empty means GET")
    parser.add_argument("--header", action="append", default=[], help="'Name: value', repeatable")
    parser.add_argument("--concurrency", type=int, default=8, help="connections kept busy")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first")
    parser.add_argument(
        "--ramp", type=float, default=0.0, help="seconds to open all connections (before --warmup)"
    )
    parser.add_argument("--timeout", type=float, default=10.0, help="a request slower is a hang")
    parser.add_argument(
        "--no-retry-after",
        dest="honour_retry_after",
        action="store_false",
        help="send again at once after a 503 instead of waiting Retry-After",
    )
    parser.add_argument("--max-retry-after", type=float, default=5.0)
    parser.add_argument("--metrics-url", default="", help="sample a gauge from this /metrics URL")
    parser.add_argument("--metric", default="executor_in_flight", help="the gauge to sample")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.concurrency < 1 or args.duration <= 0:
        print("loadgen: --concurrency must be >= 1 and --duration > 0", file=sys.stderr)
        return 2
    json.dump(Run(args).run(), sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())


def measure(
    url: str,
    *,
    body: str = "",
    headers: dict[str, str] | None = None,
    concurrency: int = 8,
    duration: float = 10.0,
    warmup: float = 2.0,
    timeout: float = 10.0,
    metrics_url: str = "",
    honour_retry_after: bool = True,
    ramp: float = 0.0,
) -> dict[str, Any]:
    """Run this load generator in a subprocess (its own core time) and return its summary."""
    import subprocess

    command = [
        sys.executable,
        __file__,
        "--url", url,
        "--body", body,
        "--concurrency", str(concurrency),
        "--duration", str(duration),
        "--warmup", str(warmup),
        "--timeout", str(timeout),
        "--ramp", str(ramp),
    ]  # fmt: skip
    for name, value in (headers or {}).items():
        command += ["--header", f"{name}: {value}"]
    if metrics_url:
        command += ["--metrics-url", metrics_url]
    if not honour_retry_after:
        command.append("--no-retry-after")
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=warmup + duration + timeout + 60
    )
    if done.returncode != 0:
        raise RuntimeError(f"loadgen failed ({done.returncode}): {done.stderr[-2000:]}")
    return dict(json.loads(done.stdout))
