"""Soak test: a long locust run at about 80% of capacity, watching every worker's memory.

It starts the executor (production gunicorn config on loopback, worker recycling
OFF: ``GUNICORN_MAX_REQUESTS`` would replace workers every ~1,000 requests and
hide exactly the leak this test looks for), runs the locust executor user (the
realistic mix: prompt sizes up to 30,000 characters, chat transcripts, 3%
invalid requests) with no think time against the 1 s simulated model, samples
the resident memory (RSS) of every worker every ``--sample-every`` seconds, and
passes when:

- locust saw zero failures (its exit code; the server checks of run.py too:
  nothing left in flight, no traceback or worker timeout in the log);
- no worker died or was replaced (same PIDs at start and end);
- every worker's RSS grew by less than ``--max-growth`` (10%) from the end of
  the warm-up to the end. The cold RSS (before the first request) is reported
  too: first requests import and cache code, which is start-up, not a leak.

Defaults: gevent, 4 workers, ES_MAX_IN_FLIGHT=200, 320 users (80% of the 400
calls in flight that E2 targets), 10 minutes.

    .venv/bin/python loadtests/soak.py                        # 10 minutes
    .venv/bin/python loadtests/soak.py --duration 2m          # a short proof
    .venv/bin/python loadtests/soak.py --worker-class gthread --threads 2 --limit 0 --users 6

Writes ``loadtests/reports/soak-*`` (locust CSV/HTML, gunicorn log, JSON) and the
RSS chart ``docs/img/soak_rss.png`` (``--chart``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from localserver import REPO, REPORTS, CpuMeter, LocalExecutor, machine, parse_duration
from run import LOCUST_GRACE_S, check_server, locust_command, print_summary, read_stats
from run import build_parser as run_parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Soak the executor at ~80% of capacity and watch worker memory.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--duration", default="10m", help="30s, 2m, 10m")
    parser.add_argument("--warmup", default="30s", help="RSS baseline taken after this")
    parser.add_argument("--users", type=int, default=320)
    parser.add_argument("--model", default="sim-1s")
    parser.add_argument("--worker-class", choices=["gthread", "gevent"], default="gevent")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit", type=int, default=200, help="ES_MAX_IN_FLIGHT (0: default)")
    parser.add_argument("--sample-every", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--max-growth", type=float, default=0.10, help="allowed RSS growth")
    parser.add_argument("--p95-ms", type=float, default=0, help="also bound p95 (0: off)")
    parser.add_argument("--report-dir", type=Path, default=REPORTS)
    parser.add_argument("--chart", type=Path, default=REPO / "docs" / "img" / "soak_rss.png")
    return parser


class RssSampler(threading.Thread):
    """Samples every worker's RSS until stopped; keeps (seconds since start, {pid: MiB})."""

    def __init__(self, server: LocalExecutor, every: float) -> None:
        super().__init__(daemon=True)
        self.server, self.every = server, every
        self.samples: list[tuple[float, dict[int, float]]] = []
        self._stop_event = threading.Event()
        self._t0 = time.monotonic()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.samples.append((time.monotonic() - self._t0, self.server.worker_rss_mb()))
            self._stop_event.wait(self.every)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(10)
        self.samples.append((time.monotonic() - self._t0, self.server.worker_rss_mb()))

    def at(self, seconds: float) -> dict[int, float]:
        """The first sample taken at or after ``seconds``."""
        for t, rss in self.samples:
            if t >= seconds:
                return rss
        return self.samples[-1][1]


def chart(
    samples: list[tuple[float, dict[int, float]]], warmup: float, path: Path, title: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pids = sorted({pid for _, rss in samples for pid in rss})
    fig, ax = plt.subplots(figsize=(9, 4.5))
    # One question per chart, the run's details under it (see capacity_charts.py).
    fig.suptitle(
        "Does a worker's memory grow during a long run?",
        fontsize=13,
        fontweight="bold",
        x=0.01,
        ha="left",
    )
    for number, pid in enumerate(pids, 1):
        points = [(t / 60, rss[pid]) for t, rss in samples if pid in rss]
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        ax.plot(xs, ys, label=f"gunicorn worker {number} (pid {pid})")
    ax.axvline(warmup / 60, color="grey", linestyle=":", label="end of warm-up (the baseline)")
    ax.set_xlabel("time since the start of the run, minutes")
    ax.set_ylabel("resident memory of the worker, MiB")
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=8, loc="left", color="#444")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    seconds, warmup = parse_duration(args.duration), parse_duration(args.warmup)
    name = f"soak-{time.strftime('%Y%m%d-%H%M%S')}"
    (args.report_dir / name).mkdir(parents=True, exist_ok=True)
    prefix = args.report_dir / name / name  # one folder per run, as run.py's
    server = LocalExecutor(
        worker_class=args.worker_class,
        workers=args.workers,
        threads=args.threads,
        max_in_flight=args.limit or None,
        max_requests=0,
        log_path=Path(f"{prefix}-gunicorn.log"),
    )
    # The locust command of run.py, with the soak's load.
    locust_args = run_parser().parse_args(
        ["--users", str(args.users), "--model", args.model, "--think-min", "0",
         "--think-max", "0", "--p95-ms", str(args.p95_ms), "--duration", f"{seconds:g}s"]
    )  # fmt: skip
    print(f"machine: {machine()}")
    print(f"soak: {server.description}, {args.users} users, {seconds:g} s, model {args.model}")
    with server:
        cold = server.worker_rss_mb()
        sampler = RssSampler(server, args.sample_every)
        sampler.start()
        meter = CpuMeter(server).start()
        env = {"LOADTEST_TARGET": "executor", "LOADTEST_API_KEY": server.api_key}
        command = locust_command(locust_args, server.url, prefix, seconds)
        try:
            code = subprocess.run(
                command, env={**server.env, **env}, timeout=seconds + LOCUST_GRACE_S
            ).returncode
        except subprocess.TimeoutExpired:
            code = 3
        cpu = meter.stop()
        sampler.stop()
        problems = check_server(server)
    start, end = sampler.at(warmup), sampler.samples[-1][1]
    if set(start) != set(cold) or set(end) != set(cold):
        problems.append(f"workers changed: {sorted(cold)} at start, {sorted(end)} at the end")
    workers = []
    print(f"{'worker':>8} {'cold MiB':>9} {'start MiB':>10} {'end MiB':>8} {'growth':>7}")
    for pid in sorted(cold):
        growth = (end[pid] - start[pid]) / start[pid] if pid in start and pid in end else None
        workers.append({"pid": pid, "cold_mib": cold[pid], "start_mib": start.get(pid),
                        "end_mib": end.get(pid), "growth": growth})  # fmt: skip
        shown = f"{growth:+.1%}" if growth is not None else "gone"
        print(
            f"{pid:>8} {cold[pid]:9.1f} {start.get(pid, 0):10.1f} {end.get(pid, 0):8.1f} {shown:>7}"
        )
        if growth is None or growth >= args.max_growth:
            problems.append(f"worker {pid}: RSS growth {shown} (limit {args.max_growth:.0%})")
    rows = read_stats(prefix)
    if rows:
        print_summary(rows)
    total = next((r for r in rows if r["Name"] == "Aggregated"), {})
    report: dict[str, Any] = {
        "machine": machine(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "server": server.description,
        "locust_exit_code": code,
        "requests": int(total.get("Request Count", 0)),
        "failures": int(total.get("Failure Count", 0)),
        "cpu": cpu,
        "workers": workers,
        "samples": [
            {"t": t, "rss_mib": {str(k): v for k, v in rss.items()}} for t, rss in sampler.samples
        ],
        "problems": problems,
    }
    Path(f"{prefix}.json").write_text(json.dumps(report, indent=2))
    title = (
        f"Soak: {server.description}, {args.users} users, {args.model}, {seconds / 60:g} min, "
        f"{report['requests']} requests, {report['failures']} failures"
    )
    chart(sampler.samples, warmup, args.chart, title)
    print(f"CPU: server {cpu['server_cores']} cores, machine {cpu['machine_cores']} cores")
    for problem in problems:
        print(f"SOAK CHECK FAILED: {problem}", file=sys.stderr)
    print(f"reports: {prefix}.json, {prefix}_stats.csv, {prefix}.html; chart: {args.chart}")
    code = code or (1 if problems else 0)
    print("PASSED" if code == 0 else f"FAILED (exit code {code})")
    return code


if __name__ == "__main__":
    sys.exit(main())
