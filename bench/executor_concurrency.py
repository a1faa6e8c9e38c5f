"""E2 and E3: calls in flight on one replica with a 1 s simulated model, and what happens beyond.

Targets (DESIGN.md):

- E2 gthread 4 x 2: 8 calls in flight, none hangs.
- E2 gevent: >= 400 calls in flight, 0 errors, p99 <= 1.25 s.
- E3 beyond capacity: the excess is answered 503 in <= 50 ms, never a hang.

Each scenario starts its own gunicorn (the production config, worker recycling
off so the same processes serve the whole run), drives it with
``loadtests/loadgen.py`` in a separate process (N keep-alive connections, a
closed loop, connections opened over one model latency so a fixed-latency model
does not keep every client in lock-step, Retry-After honoured after a 503), and
prints each figure, its ratio to the target, and a verdict. "In flight" is shown
three ways: the client's concurrency, Little's law on the client's figures
(throughput x mean latency), and the server's own ``executor_in_flight`` gauge
sampled every 0.25 s from /metrics (under gthread the sampling request itself
takes one of the threads, so the gauge there reads at most capacity - 1).

Scenarios (``--only`` picks some):

    e2-gthread       gthread 4 x 2, 8 connections
    e2-gevent        gevent 4 workers, the shipped limit (250 per process) or --gevent-limit,
                     400 connections
    e2-gevent-100    the same with limit 100 per process (the default before 2026-11-25)
    e3-gevent        gevent 4 workers, limit 100 (400 admitted), 600 connections
    e3-gthread       gthread 4 x 8, ES_MAX_IN_FLIGHT=2 (8 admitted), 32 connections
    e3-gthread-queue gthread 4 x 2 (threads = limit), 16 connections: the excess waits, no 503

    .venv/bin/python bench/executor_concurrency.py
    .venv/bin/python bench/executor_concurrency.py --only e2-gevent,e3-gevent --duration 20
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "loadtests"))

from loadgen import measure
from localserver import CpuMeter, LocalExecutor, machine

MODEL_S = 1.0
BODY = json.dumps({"model": "sim-1s", "prompt": "How long is a piece of string?"})
P99_BOUND_S = 1.25
REFUSAL_BOUND_S = 0.050
# A call slower than this is counted as hung (the model takes 1 s).
HANG_S = 10.0


@dataclass
class Scenario:
    name: str
    what: str
    worker_class: str
    workers: int
    threads: int
    limit: int | None  # ES_MAX_IN_FLIGHT; None = the config's default
    concurrency: int
    expect: str  # "all-ok" (E2), "refuse" (E3), "queue" (the gthread caveat)


def scenarios(gevent_limit: int | None) -> list[Scenario]:
    return [
        Scenario("e2-gthread", "E2 gthread 4x2", "gthread", 4, 2, None, 8, "all-ok"),
        Scenario(
            "e2-gevent", f"E2 gevent, limit {gevent_limit or 'default 250'}", "gevent", 4, 1,
            gevent_limit, 400, "all-ok",
        ),
        Scenario("e2-gevent-100", "E2 gevent, limit 100", "gevent", 4, 1, 100, 400, "all-ok"),
        Scenario("e3-gevent", "E3 gevent, limit 100, 1.5x", "gevent", 4, 1, 100, 600, "refuse"),
        Scenario("e3-gthread", "E3 gthread 4x8 limit 2, 4x", "gthread", 4, 8, 2, 32, "refuse"),
        Scenario("e3-gthread-queue", "gthread 4x2, 2x: queued", "gthread", 4, 2, None, 16, "queue"),
    ]  # fmt: skip


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


def judge(s: Scenario, r: dict[str, Any]) -> tuple[bool, list[str]]:
    """The verdict for one scenario, and the lines that explain it."""
    ok, refused = r["latency_ok_s"], r["latency_503_s"]
    statuses = r["statuses"]
    others = sum(n for code, n in statuses.items() if code not in {"200", "503"})
    errors = sum(r["errors"].values())
    capacity = s.workers * (s.limit or (s.threads if s.worker_class == "gthread" else 250))
    lines = [
        f"  requests {r['requests']}, statuses {statuses}, transport errors {r['errors'] or 0}, "
        f"hangs {r['hangs']}",
        f"  200: {r['ok_per_s']:.1f}/s  p50 {ms(ok['p50'])}  p95 {ms(ok['p95'])}  "
        f"p99 {ms(ok['p99'])}  max {ms(ok['max'])}",
        f"  in flight: clients {s.concurrency}, Little {r['in_flight_little']:.0f}, "
        f"server gauge max {r['in_flight_server']['max'] or 0:.0f} "
        f"(median {r['in_flight_server']['p50'] or 0:.0f}); admitted capacity {capacity}",
        f"  CPU cores used: server {r['cpu']['server_cores']}, loadgen "
        f"{r['client_cpu_share']:.2f}, whole machine {r['cpu']['machine_cores']} of "
        f"{machine()['cpus']} (the rest is other processes)",
    ]
    if refused["count"]:
        lines.append(
            f"  503: {r['overloaded_per_s']:.1f}/s  p50 {ms(refused['p50'])}  "
            f"p99 {ms(refused['p99'])}  max {ms(refused['max'])}  "
            f"(p99 / 50 ms = {refused['p99'] / REFUSAL_BOUND_S:.2f})"
        )
    no_hang = r["hangs"] == 0 and errors == 0 and others == 0
    if s.expect == "all-ok":
        p99 = ok["p99"] or float("inf")
        passed = no_hang and "503" not in statuses and p99 <= P99_BOUND_S
        lines.append(
            f"  p99 / 1.25 s = {p99 / P99_BOUND_S:.2f};  in flight (Little) / "
            f"{s.concurrency} = {r['in_flight_little'] / s.concurrency:.2f}"
        )
    elif s.expect == "refuse":
        p99 = refused["p99"] if refused["count"] else float("inf")
        passed = no_hang and bool(refused["count"]) and p99 <= REFUSAL_BOUND_S
    else:  # queue: the honest picture of gthread without spare threads
        passed = no_hang and (ok["max"] or 0) < HANG_S
        lines.append(
            f"  no 503 by design (threads = limit): the excess waits to be accepted, "
            f"p50 / model latency = {(ok['p50'] or 0) / MODEL_S:.2f}"
        )
    return passed, lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="E2/E3: in flight and beyond capacity, 1 s simulated model, one replica.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--only", default="", help="comma-separated scenario names")
    parser.add_argument("--duration", type=float, default=15.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument(
        "--gevent-limit",
        type=int,
        default=None,
        help="ES_MAX_IN_FLIGHT for e2-gevent (default: the shipped default, 250)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    chosen = [
        s for s in scenarios(args.gevent_limit) if not args.only or s.name in args.only.split(",")
    ]
    if not chosen:
        print("no scenario matches --only", file=sys.stderr)
        return 2
    print(f"machine: {machine()}")
    results: list[dict[str, Any]] = []
    for s in chosen:
        server = LocalExecutor(
            worker_class=s.worker_class,
            workers=s.workers,
            threads=s.threads,
            max_in_flight=s.limit,
            max_requests=0,
        )
        with server:
            meter = CpuMeter(server).start()
            r = measure(
                server.url + "/execute",
                body=BODY,
                headers=server.headers,
                concurrency=s.concurrency,
                duration=args.duration,
                warmup=args.warmup,
                timeout=HANG_S,
                metrics_url=server.url + "/metrics",
                ramp=MODEL_S,
            )
            r["cpu"] = meter.stop()
            trouble = server.trouble()
        passed, lines = judge(s, r)
        if trouble:
            passed = False
            lines.append(f"  server log trouble: {trouble[:2]}")
        print(f"{s.name}: {s.what} ({server.description}), {s.concurrency} connections "
              f"-> {'PASS' if passed else 'FAIL'}")  # fmt: skip
        print("\n".join(lines), flush=True)
        results.append({"scenario": asdict(s), "passed": passed, "result": r})
    print(
        "summary: "
        + ", ".join(f"{x['scenario']['name']} {'PASS' if x['passed'] else 'FAIL'}" for x in results)
    )
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
