"""E1: the executor's own overhead, as a ratio to a bare Flask JSON endpoint.

Target (DESIGN.md): ``POST /execute`` on a zero-latency simulated model reaches
>= 0.9x the requests/s of a bare Flask JSON endpoint (bench/bare_app.py) under
the same gunicorn config, with the same load generator, in the same run.

Both servers run side by side on loopback from the start (an idle one costs
nothing); the load generator (loadtests/loadgen.py, a separate process) drives
them in turn, alternating the order each round so that drift in the machine's
background load hits both equally, and the script prints the median of the
rounds and the ratio. The executor runs as deployed: API key checked, request
validated by the schema, admission slot, Prometheus metrics (multiprocess),
app logs at ``--log-level``; the gunicorn access log is off for both.

    .venv/bin/python bench/executor_overhead.py                      # gthread 4 x 2
    .venv/bin/python bench/executor_overhead.py --worker-class gevent
    .venv/bin/python bench/executor_overhead.py --log-level info     # with per-request logs
    git worktree add /tmp/before <commit> && \
    .venv/bin/python bench/executor_overhead.py --before /tmp/before  # + that executor too

Exit code 0 whatever the ratio: a benchmark reports, it does not judge (use
``--json`` to keep the figures).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "loadtests"))

from loadgen import measure
from localserver import CpuMeter, LocalExecutor, machine

TARGET_RATIO = 0.9
BODY = json.dumps(
    {"model": "sim-zero", "prompt": "What is the capital of France?", "max_tokens": 64}
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="E1: executor vs bare Flask requests/s under one gunicorn config.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--worker-class", choices=["gthread", "gevent"], default="gthread")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=16, help="connections kept busy")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--log-level", default="warning", help="the executor's ES_LOG_LEVEL")
    parser.add_argument(
        "--before",
        type=Path,
        help="a checkout of an earlier commit: its executor runs as a third server in the "
        "same rounds (before/after a change, same load)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    common: dict[str, Any] = {
        "worker_class": args.worker_class,
        "workers": args.workers,
        "threads": args.threads,
        "max_requests": 0,  # the same processes throughout: no recycling mid-measurement
    }
    executor = LocalExecutor(**common, log_level=args.log_level)
    bare = LocalExecutor(**common, app="bench.bare_app:app", api_key="")
    servers = {"bare": bare, "executor": executor}
    if args.before is not None:
        tree = args.before.resolve()  # gunicorn imports the package from its cwd first
        servers["before"] = LocalExecutor(**common, log_level=args.log_level, tree=tree)
    print(f"machine: {machine()}")
    print(
        f"gunicorn: {executor.description}; load: {args.concurrency} connections, "
        f"{args.duration:g} s x {args.rounds} rounds; executor logs at {args.log_level}"
    )
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in servers}
    with contextlib.ExitStack() as running:
        for server in servers.values():
            running.enter_context(server)
        names = list(servers)
        for round_no in range(args.rounds):
            k = round_no % len(names)
            order = names[k:] + names[:k]  # each server first in turn
            for name in order:
                server = servers[name]
                meter = CpuMeter(server).start()
                result = measure(
                    server.url + "/execute",
                    body=BODY,
                    headers=server.headers,
                    concurrency=args.concurrency,
                    duration=args.duration,
                    warmup=args.warmup,
                )
                result["cpu"] = meter.stop()
                runs[name].append(result)
                lat = result["latency_ok_s"]
                bad = result["requests"] - lat["count"]
                print(
                    f"round {round_no + 1} {name:<8} {result['ok_per_s']:8.1f} req/s  "
                    f"p50 {lat['p50'] * 1000:6.1f} ms  p99 {lat['p99'] * 1000:6.1f} ms  "
                    f"non-200 {bad}  cores: server {result['cpu']['server_cores']}, loadgen "
                    f"{result['client_cpu_share']:.2f}, machine {result['cpu']['machine_cores']}",
                    flush=True,
                )
        trouble = [line for server in servers.values() for line in server.trouble()]
    medians = {name: statistics.median(r["ok_per_s"] for r in rs) for name, rs in runs.items()}
    # Requests per CPU-second of the server: what the app costs, whatever else ran on
    # the machine (on a busy 2-core box the req/s ratio also measures the neighbours).
    per_cpu = {
        name: statistics.median(r["ok_per_s"] / max(r["cpu"]["server_cores"], 1e-3) for r in rs)
        for name, rs in runs.items()
    }
    ratio = medians["executor"] / medians["bare"]
    cpu_ratio = per_cpu["executor"] / per_cpu["bare"]
    verdict = "meets" if ratio >= TARGET_RATIO else "BELOW"
    for name in servers:
        print(
            f"median {name:<8} {medians[name]:8.1f} req/s, "
            f"{per_cpu[name]:7.0f} req per server CPU-second "
            f"({1000 / per_cpu[name]:.2f} ms of CPU per request)"
        )
    print(f"E1 ratio executor/bare = {ratio:.2f}  ({verdict} the >= {TARGET_RATIO} target)")
    print(f"   CPU-cost ratio (req per CPU-second, executor/bare) = {cpu_ratio:.2f}")
    if "before" in servers:
        print(
            f"before: ratio {medians['before'] / medians['bare']:.2f}, CPU-cost ratio "
            f"{per_cpu['before'] / per_cpu['bare']:.2f}"
        )
    if trouble:
        print(f"server log trouble: {trouble[:3]}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"machine": machine(), "args": vars(args) | {"json": str(args.json)},
                 "runs": runs, "medians": medians, "ratio": ratio,
                 "per_cpu_second": per_cpu, "cpu_ratio": cpu_ratio},
                indent=2,
            )
        )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
