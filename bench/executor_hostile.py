"""E4: hostile clients against the default executor, no proxy in front.

Target (DESIGN.md): with 64 idle sockets and 16 slowloris clients held open,
/health <= 100 ms and /execute answered as without them.

Starts ``executor-service serve`` exactly as a user does (no GUNICORN_* variable;
only a catalog with a 100 ms simulated model), then measures twice, first with
nothing else connected and then with the hostile clients held open:

- /health: sequential requests, latency p50 / p99 / max;
- /execute: 4 closed-loop clients for ``--seconds``, latency p50 / p99 and calls/s.

``--also-gthread`` repeats the hostile run with ``--worker-class gthread`` (the
default before), with a 5 s client timeout, to show what the change is for.

    .venv/bin/python bench/executor_hostile.py
    .venv/bin/python bench/executor_hostile.py --seconds 10 --also-gthread
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from support import HostileClients, free_port, wait_until, write_catalog  # noqa: E402

HEALTH_BOUND_S = 0.100
# /execute "answered as without them": p50 within this ratio of the baseline's.
EXECUTE_RATIO_BOUND = 1.25
CLIENT_TIMEOUT_S = 5.0
BODY = {"model": "sim", "prompt": "How long is a piece of string?"}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def start(worker_class: str | None, tmp: Path) -> tuple[subprocess.Popen[bytes], str, int]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("ES_", "GUNICORN_", "PROMETHEUS_", "DISPATCHER_"))
        and k not in {"WEB_CONCURRENCY", "HOST", "PORT"}
    }
    catalog = write_catalog(
        tmp / "catalog.toml", {"sim": {"provider": "simulated", "latency_s": 0.1}}
    )
    env.update(ES_CATALOG=str(catalog), ES_LOG_LEVEL="warning", GUNICORN_ACCESSLOG="")
    port = free_port()
    argv = [str(Path(sys.executable).parent / "executor-service"), "serve", "--port", str(port)]
    if worker_class:
        argv += ["--worker-class", worker_class]
    log = (tmp / f"serve-{port}.log").open("wb")
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: requests.get(url + "/ready", timeout=2).ok, 60, what="serve")
    return proc, url, port


def measure(url: str, seconds: float) -> dict[str, Any]:
    health: list[float] = []
    health_failed = 0
    give_up = time.monotonic() + 3 * seconds  # a frozen server is not waited for forever
    for _ in range(100):
        if time.monotonic() > give_up:
            health_failed += 1
            continue
        started = time.monotonic()
        try:
            ok = requests.get(url + "/health", timeout=CLIENT_TIMEOUT_S).status_code == 200
        except requests.RequestException:
            ok = False
        if ok:
            health.append(time.monotonic() - started)
        else:
            health_failed += 1
    execute: list[float] = []
    failed = [0]
    stop = time.monotonic() + seconds
    lock = threading.Lock()

    def client() -> None:
        session = requests.Session()
        while time.monotonic() < stop:
            started = time.monotonic()
            try:
                ok = session.post(url + "/execute", json=BODY, timeout=CLIENT_TIMEOUT_S).ok
            except requests.RequestException:
                ok = False
            with lock:
                if ok:
                    execute.append(time.monotonic() - started)
                else:
                    failed[0] += 1

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {
        "health_p50_ms": percentile(health, 0.5) * 1000,
        "health_p99_ms": percentile(health, 0.99) * 1000,
        "health_max_ms": max(health, default=float("nan")) * 1000,
        "health_failed": health_failed,
        "execute_p50_ms": percentile(execute, 0.5) * 1000,
        "execute_p99_ms": percentile(execute, 0.99) * 1000,
        "execute_per_s": len(execute) / seconds,
        "execute_failed": failed[0],
    }


def show(name: str, m: dict[str, Any]) -> None:
    print(
        f"{name:<24} /health p50 {m['health_p50_ms']:7.1f} ms  p99 {m['health_p99_ms']:7.1f} ms"
        f"  max {m['health_max_ms']:7.1f} ms  failed {m['health_failed']:3d}/100 | /execute p50"
        f" {m['execute_p50_ms']:7.1f} ms  p99 {m['execute_p99_ms']:7.1f} ms"
        f"  {m['execute_per_s']:5.1f}/s  failed {m['execute_failed']}"
    )


def run(worker_class: str | None, seconds: float, hostile_only: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-hostile-") as name:
        proc, url, port = start(worker_class, Path(name))
        label = worker_class or "default"
        try:
            base = None if hostile_only else measure(url, seconds)
            if base is not None:
                show(f"{label}, alone", base)
            with HostileClients(port, idle=64, slowloris=16):
                time.sleep(2)  # let every slow client send a few bytes first
                hostile = measure(url, seconds)
            show(f"{label}, 64 idle + 16 slow", hostile)
            return {"base": base, "hostile": hostile}
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(40)
            except subprocess.TimeoutExpired:
                proc.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--also-gthread", action="store_true")
    args = parser.parse_args(argv)
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
    result = run(None, args.seconds, hostile_only=False)
    base, hostile = result["base"], result["hostile"]
    ratio = hostile["execute_p50_ms"] / base["execute_p50_ms"]
    health_ok = hostile["health_max_ms"] <= HEALTH_BOUND_S * 1000 and not hostile["health_failed"]
    execute_ok = ratio <= EXECUTE_RATIO_BOUND and not hostile["execute_failed"]
    print(
        f"E4 /health max {hostile['health_max_ms']:.1f} ms (target <= 100 ms): "
        f"{'MET' if health_ok else 'NOT MET'}"
    )
    print(
        f"E4 /execute p50 {ratio:.2f}x the run without them, "
        f"{hostile['execute_per_s'] / base['execute_per_s']:.2f}x the calls/s "
        f"(target: as without them, <= {EXECUTE_RATIO_BOUND}x): "
        f"{'MET' if execute_ok else 'NOT MET'}"
    )
    if args.also_gthread:
        run("gthread", min(args.seconds, 10.0), hostile_only=True)
    return 0 if health_ok and execute_ok else 1


if __name__ == "__main__":
    sys.exit(main())
