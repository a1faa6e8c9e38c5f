"""D6: scale-out, 1, 2 and 4 dispatcher processes on one PostgreSQL, instant executors.

Target (DESIGN.md): throughput grows >= 1.7x at 2 and >= 3x at 4 processes on a
machine with the cores for it; on a small machine, say so and report claims/s per
process. This script prints, for each process count N (a fresh database each):

- executions/s of the whole fleet over the measured window, and its ratio to N = 1;
- per dispatcher process: claims/s (its own Prometheus metrics), its region-worker
  process's CPU, and the CPU of the PostgreSQL backends serving it (each process
  connects with its own ``application_name``; ``pg_stat_activity`` names their
  backends), each per execution it ran;
- the concurrency check: every region's calls never overlapped more than its
  ``concurrency`` while the processes ran. Two views of it: exact, from the attempt
  log (a call is in flight at the executor only between its attempt's
  ``started_at`` and ``finished_at``, which the dispatcher takes around the HTTP
  call, so the largest overlap of those intervals bounds what the executor saw);
  and sampled, the executor's own ``executor_in_flight`` gauge read from its
  ``/metrics`` every 20 ms (a lower bound: samples miss short peaks).

Set-up: ``--regions`` regions of ``--concurrency`` slots, each with its own executor
(gevent, simulated models of latency ``--latency``, default 0); every dispatcher
process serves every region (the regions file is shared), so a region's slots are
shared by the fleet through the store. Process 1 also runs the HTTP API (the job
is submitted and watched there); the others run ``--no-api``. One job of
questions x models x regions, big enough to outlast the measurement, cancelled
after it.

    .venv/bin/python bench/dispatcher_scaleout.py
    .venv/bin/python bench/dispatcher_scaleout.py --processes 1,2 --duration 10
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from contextlib import ExitStack, suppress
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import requests
from common import (
    Dispatcher,
    Executor,
    RegionConf,
    cpu_seconds,
    machine,
    noisy,
    store_url,
    wait_job_finished,
    workdir,
    write_regions,
)

MODELS = [f"sim-{i}" for i in range(4)]
POLL_S = 0.5
TARGETS = {2: 1.7, 4: 3.0}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="D6: 1, 2, 4 dispatcher processes on one PostgreSQL.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--processes", default="1,2,4", help="dispatcher process counts")
    parser.add_argument("--regions", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=16, help="slots per region")
    parser.add_argument("--latency", type=float, default=0.0, help="simulated model latency, s")
    parser.add_argument("--duration", type=float, default=8.0, help="measured seconds per N")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--questions", type=int, default=5000, help="per model (job size)")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--json", type=Path)
    return parser


def with_app_name(url: str, name: str) -> str:
    parts = urlsplit(url)
    query = "&".join(q for q in (parts.query, urlencode({"application_name": name})) if q)
    return parts._replace(query=query).geturl()


def backend_pids(url: str) -> dict[str, list[int]]:
    """application_name -> pids of the PostgreSQL backends connected to this database."""
    import psycopg

    db = urlsplit(url).path.lstrip("/")
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT application_name, pid FROM pg_stat_activity WHERE datname = %s", (db,)
        ).fetchall()
    out: dict[str, list[int]] = {}
    for name, pid in rows:
        out.setdefault(name, []).append(pid)
    return out


def max_overlap(url: str) -> dict[str, int]:
    """Per region, the largest number of attempts whose [started_at, finished_at] overlap."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT region, started_at, finished_at FROM attempts WHERE finished_at IS NOT NULL"
        ).fetchall()
    events: dict[str, list[tuple[float, int]]] = {}
    for region, started, finished in rows:
        # an end sorts before a start at the same instant: touching intervals do not overlap
        events.setdefault(region, []).extend([(started, 1), (finished, -1)])
    out = {}
    for region, evs in events.items():
        evs.sort(key=lambda e: (e[0], e[1]))
        now = peak = 0
        for _, step in evs:
            now += step
            peak = max(peak, now)
        out[region] = peak
    return out


class GaugeSampler:
    """Reads ``executor_in_flight`` from each executor's /metrics every ``every_s``."""

    def __init__(self, executors: dict[str, Executor], every_s: float = 0.02) -> None:
        self.executors = executors
        self.every_s = every_s
        self.peak = {name: 0.0 for name in executors}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        session = requests.Session()
        while not self._stop.wait(self.every_s):
            for name, ex in self.executors.items():
                with suppress(requests.RequestException, ValueError):
                    text = session.get(ex.url + "/metrics", timeout=2).text
                    for line in text.splitlines():
                        if line.startswith("executor_in_flight"):
                            self.peak[name] = max(self.peak[name], float(line.split()[-1]))
            self.samples += 1

    def __enter__(self) -> GaugeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def run_fleet(
    n: int, args: argparse.Namespace, tmp: Path, executors: dict[str, Executor]
) -> dict[str, Any]:
    regions = {
        name: RegionConf(ex.url, args.concurrency, tuple(MODELS)) for name, ex in executors.items()
    }
    regions_file = write_regions(tmp / f"regions-{n}.toml", regions)
    with ExitStack() as stack:
        url = stack.enter_context(store_url("postgres", tmp))
        fleet = []
        for i in range(n):
            d = Dispatcher(
                tmp, with_app_name(url, f"d6-p{i + 1}"), regions_file, api=(i == 0),
                name=f"dispatcher-{n}-{i + 1}",
            )  # fmt: skip
            stack.callback(d.stop)
            d.start()
            fleet.append(d)
        api = fleet[0].api()
        job = api.submit({"questions": [f"q{i}" for i in range(args.questions)], "models": MODELS})
        worker_pids = [d.worker_pid() for d in fleet]

        def snapshot() -> dict[str, Any]:
            backends = backend_pids(url)
            store_cpu = []
            for i in range(n):
                total = 0.0
                for pid in backends.get(f"d6-p{i + 1}", []):
                    with suppress(OSError):
                        total += cpu_seconds(pid)
                store_cpu.append(total)
            return {
                "t": time.monotonic(),
                "succeeded": api.job(job["id"])["states"].get("succeeded", 0),
                "worker_cpu": [cpu_seconds(p) for p in worker_pids],
                "store_cpu": store_cpu,
                "metrics": [d.metric_totals() for d in fleet],
            }

        sampler = stack.enter_context(GaugeSampler(executors))
        time.sleep(args.warmup)
        first = snapshot()
        time.sleep(args.duration)
        last = snapshot()
        sampler.__exit__()
        api.cancel(job["id"])
        wait_job_finished(api, job["id"], timeout=120)
        overlap = max_overlap(url)
    window = last["t"] - first["t"]
    executions = last["succeeded"] - first["succeeded"]
    per_process = []
    for i in range(n):
        m0, m1 = first["metrics"][i], last["metrics"][i]

        def delta(name: str, m0: dict[str, float] = m0, m1: dict[str, float] = m1) -> float:
            return m1.get(name, 0.0) - m0.get(name, 0.0)

        ran = max(delta("dispatcher_calls_total"), 1.0)
        worker_cpu = last["worker_cpu"][i] - first["worker_cpu"][i]
        store_cpu = last["store_cpu"][i] - first["store_cpu"][i]
        per_process.append(
            {
                "claims_per_s": delta("dispatcher_claim_seconds_count") / window,
                "claimed_per_s": delta("dispatcher_claimed_total") / window,
                "claim_ms": 1000
                * delta("dispatcher_claim_seconds_sum")
                / max(delta("dispatcher_claim_seconds_count"), 1.0),
                "calls_per_s": delta("dispatcher_calls_total") / window,
                "worker_cores": worker_cpu / window,
                "worker_cpu_ms_per_execution": 1000 * worker_cpu / ran,
                "store_cores": store_cpu / window,
                "store_cpu_ms_per_execution": 1000 * store_cpu / ran,
            }
        )
    return {
        "processes": n,
        "rate": executions / window,
        "window_s": window,
        "executions_in_window": executions,
        "per_process": per_process,
        "max_overlap": overlap,
        "gauge_peak": sampler.peak,
        "gauge_samples": sampler.samples,
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    counts = [int(x) for x in args.processes.split(",") if x.strip()]
    print(f"machine: {machine()}")
    print(noisy())
    results = []
    with ExitStack() as stack:
        tmp = stack.enter_context(workdir(args.keep))
        executors = {}
        for r in range(args.regions):
            ex = Executor(
                tmp,
                f"r{r + 1}",
                {m: {"provider": "simulated", "latency_s": args.latency} for m in MODELS},
                workers=1,
                worker_class="gevent",
            )
            stack.callback(ex.stop)
            ex.start()
            executors[f"r{r + 1}"] = ex
        print(
            f"{args.regions} regions x {args.concurrency} slots, one executor each (gevent, 1 "
            f"worker, latency {args.latency:g} s); {args.warmup:g} s warm-up + "
            f"{args.duration:g} s measured per process count",
            flush=True,
        )
        for n in counts:
            r = run_fleet(n, args, tmp, executors)
            results.append(r)
            over = {k: v for k, v in r["max_overlap"].items() if v > args.concurrency}
            print(
                f"N={n}: {r['rate']:.1f} executions/s over {r['window_s']:.1f} s; largest "
                f"overlap of calls per region {r['max_overlap']} (limit {args.concurrency}: "
                + ("OVER in " + ", ".join(over) if over else "never over")
                + f"); executor in-flight gauge peak {r['gauge_peak']} over "
                f"{r['gauge_samples']} samples",
                flush=True,
            )
            for i, p in enumerate(r["per_process"], start=1):
                print(
                    f"    process {i}: {p['claims_per_s']:.0f} claims/s ({p['claimed_per_s']:.0f} "
                    f"executions/s claimed, {p['claim_ms']:.1f} ms per claim); region workers "
                    f"{p['worker_cores']:.2f} cores, {p['worker_cpu_ms_per_execution']:.2f} ms CPU "
                    f"per execution; its PostgreSQL backends {p['store_cores']:.2f} cores, "
                    f"{p['store_cpu_ms_per_execution']:.2f} ms CPU per execution",
                    flush=True,
                )
    base = results[0]["rate"] if results and results[0]["processes"] == 1 else None
    for r in results:
        if base:
            target = TARGETS.get(r["processes"])
            growth = r["rate"] / base
            print(
                f"D6 N={r['processes']}: {r['rate']:.1f} executions/s = {growth:.2f}x N=1"
                + (f" (target >= {target}x on a machine with the cores for it)" if target else "")
            )
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
