"""Capacity study: one replica, a 1 s simulated model, throughput and latency against concurrency.

For each server configuration it starts one gunicorn (the production config on
loopback, worker recycling off), then for each concurrency level drives it with
``loadgen.py`` (N keep-alive connections in a closed loop, no think time, 503
answered by waiting Retry-After) and records: 200s per second; p50/p95/p99 of
the 200s; 503s per second and their p99; the CPU the server and the machine used.
With a 1 s model, N connections all admitted means N requests/s: the throughput
line bends where the server stops admitting, and the latency lines show what
happens to the excess: waiting to be accepted (gthread with threads = limit:
a worker accepts only what its threads can run, the rest wait in the listen
backlog and latency grows in 1 s steps) or refused at once with 503 (the
admission limit).

Configurations (``--only`` picks some):

    gthread-4x2          gthread 4 workers x 2 threads, limit 2 (the seed default): 8 admitted
    gthread-4x16         gthread 4 x 16, limit 16: 64 admitted
    gthread-4x16-limit8  gthread 4 x 16, ES_MAX_IN_FLIGHT=8: 32 admitted, 8 spare threads
                         per worker answer the excess 503 at once
    gevent-4             gevent 4 workers, limit 100 (the default): 400 admitted nominally
    gevent-4-limit200    gevent 4 workers, ES_MAX_IN_FLIGHT=200

Results: ``docs/img/capacity.json`` and the charts of ``capacity_charts.py``
(``docs/img/capacity_*.png``, ``--out``). ``--plot-only`` redraws the charts from the
JSON without measuring.

    .venv/bin/python loadtests/capacity.py                  # about 12 minutes
    .venv/bin/python loadtests/capacity.py --quick          # about 4 minutes, coarser
    .venv/bin/python loadtests/capacity.py --only gevent-4 --duration 20
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from capacity_charts import plot
from loadgen import measure
from localserver import REPO, CpuMeter, LocalExecutor, machine, wait_until

BODY = json.dumps({"model": "sim-1s", "prompt": "How many regions serve this model?"})
MODEL_S = 1.0
OUT = REPO / "docs" / "img"


@dataclass
class Config:
    name: str
    label: str
    worker_class: str
    workers: int
    threads: int
    limit: int | None
    levels: list[int]
    quick_levels: list[int] = field(default_factory=list)

    @property
    def admitted(self) -> int:
        """Calls the admission limits let in, if connections spread evenly over workers."""
        per_process = self.limit or (self.threads if self.worker_class == "gthread" else 100)
        return self.workers * per_process


CONFIGS = [
    Config("gthread-4x2", "gthread 4x2, limit 2", "gthread", 4, 2, None,
           [1, 2, 4, 6, 8, 10, 12, 16, 24, 32], [2, 4, 8, 12, 16, 32]),
    Config("gthread-4x16", "gthread 4x16, limit 16", "gthread", 4, 16, None,
           [8, 16, 32, 48, 64, 72, 80, 96, 128], [16, 32, 64, 80, 128]),
    Config("gthread-4x16-limit8", "gthread 4x16, limit 8", "gthread", 4, 16, 8,
           [8, 16, 24, 32, 40, 48, 64, 96], [16, 32, 48, 96]),
    Config("gevent-4", "gevent 4 workers, limit 100", "gevent", 4, 1, None,
           [50, 100, 200, 300, 350, 400, 500, 600, 800], [100, 300, 400, 600]),
    Config("gevent-4-limit200", "gevent 4 workers, limit 200", "gevent", 4, 1, 200,
           [100, 200, 300, 400, 500, 600, 800], [200, 400, 600]),
]  # fmt: skip


def measure_config(config: Config, levels: list[int], args: argparse.Namespace) -> dict[str, Any]:
    """Every level of one configuration, on one gunicorn."""
    server = LocalExecutor(
        worker_class=config.worker_class,
        workers=config.workers,
        threads=config.threads,
        max_in_flight=config.limit,
        max_requests=0,
    )
    points: list[dict[str, Any]] = []
    with server:
        for users in levels:
            meter = CpuMeter(server).start()
            r = measure(
                server.url + "/execute",
                body=BODY,
                headers=server.headers,
                concurrency=users,
                duration=args.duration,
                warmup=args.warmup,
                timeout=args.hang_s,
                ramp=MODEL_S,
            )
            cpu = meter.stop()
            ok, refused = r["latency_ok_s"], r["latency_503_s"]
            answered = sum(r["statuses"].values())
            point = {
                "users": users,
                "ok_per_s": r["ok_per_s"],
                "p50_s": ok["p50"],
                "p95_s": ok["p95"],
                "p99_s": ok["p99"],
                "max_s": ok["max"],
                "overloaded_per_s": r["overloaded_per_s"],
                "overloaded_share": refused["count"] / answered if answered else 0.0,
                "overloaded_p99_s": refused["p99"],
                "statuses": r["statuses"],
                "errors": r["errors"],
                "hangs": r["hangs"],
                "server_cores": cpu["server_cores"],
                "machine_cores": cpu["machine_cores"],
                "loadgen_cores": r["client_cpu_share"],
            }
            points.append(point)
            p99 = f"{point['p99_s'] * 1000:.0f}" if point["p99_s"] else "-"
            print(
                f"{config.name:<20} {users:>4} users  {point['ok_per_s']:6.1f} ok/s  "
                f"p50 {(point['p50_s'] or 0) * 1000:5.0f}  p99 {p99:>5} ms  "
                f"503 {point['overloaded_share']:6.1%}  hangs {point['hangs']}  "
                f"cores: server {cpu['server_cores']:.2f} machine {cpu['machine_cores']:.2f}",
                flush=True,
            )
            # The next level starts from an idle server.
            wait_until(lambda: server.metric("executor_in_flight") == 0, 30, 0.2, "idle server")
        trouble = server.trouble()
    onset = next((p["users"] for p in points if p["overloaded_share"] > 0), None)
    return {
        "config": asdict(config) | {"admitted": config.admitted},
        "server": server.description,
        "points": points,
        "first_503_at_users": onset,
        "peak_ok_per_s": max(p["ok_per_s"] for p in points),
        "server_trouble": trouble[:5],
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Capacity study of one executor replica with a 1 s simulated model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--only", default="", help="comma-separated configuration names")
    parser.add_argument("--quick", action="store_true", help="fewer levels, shorter runs")
    parser.add_argument(
        "--duration", type=float, default=0, help="measured s per level (12; quick 5)"
    )
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--hang-s", type=float, default=15.0, help="a call slower is a hang")
    parser.add_argument("--out", type=Path, default=OUT, help="directory for the JSON and PNGs")
    parser.add_argument("--plot-only", action="store_true", help="redraw from OUT/capacity.json")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    data_path = args.out / "capacity.json"
    if args.plot_only:
        study = json.loads(data_path.read_text())
    else:
        args.duration = args.duration or (5.0 if args.quick else 12.0)
        chosen = [c for c in CONFIGS if not args.only or c.name in args.only.split(",")]
        if not chosen:
            print("no configuration matches --only", file=sys.stderr)
            return 2
        started = time.time()
        study = {
            "machine_before": machine(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
            "duration_per_level_s": args.duration,
            "quick": args.quick,
            "results": [],
        }
        for config in chosen:
            levels = config.quick_levels if args.quick and config.quick_levels else config.levels
            study["results"].append(measure_config(config, levels, args))
        study["machine_after"] = machine()
        study["elapsed_s"] = round(time.time() - started)
        data_path.write_text(json.dumps(study, indent=2))
    for res in study["results"]:
        print(
            f"{res['config']['name']:<20} peak {res['peak_ok_per_s']:6.1f} ok/s "
            f"(admitted capacity {res['config']['admitted']}), first 503 at "
            f"{res['first_503_at_users'] or 'no'} users"
        )
    for path in plot(study, args.out):
        print(f"chart: {path}")
    print(f"data: {data_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
