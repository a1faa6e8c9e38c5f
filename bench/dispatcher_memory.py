"""M1: memory. The dispatcher with 100,000 queued executions, and an executor worker
without a local model.

Targets (DESIGN.md): dispatcher with 100,000 queued <= 200 MB RSS; executor worker
without a local model <= 80 MB RSS.

Dispatcher: the real ``executor-service dispatcher`` (package defaults) with
``--regions`` regions of ``--slots`` slots, all pointing at one slow executor
(simulated latency ``--latency`` s), so the region workers keep every slot busy
while the queue stays at ~100,000. One job of ``--queued`` executions goes in
through ``POST /jobs`` (10,000 questions x 5 models x 2 regions by default).
Then, every second for ``--observe`` s, the script asks ``GET /queue`` and
``GET /jobs/<id>`` (what a dashboard would) and reads VmRSS from
``/proc/<pid>/status`` for each process of the dispatcher: the region-worker
process (the ``dispatcher`` command itself), the API's gunicorn master and its
worker. It prints the largest VmRSS seen, the peak (VmHWM: it includes the
moment the API worker inserted the job) and the baseline: the same processes
idle, before the job, in the same run.

Executor worker: a gunicorn with the production config (gthread 4 x 2, and gevent
4 workers) whose catalog holds only simulated models; after warm-up traffic,
each worker's VmRSS (and PSS, shared pages split among the processes using
them) is read; the baseline is the same worker right after start.

    .venv/bin/python bench/dispatcher_memory.py
    .venv/bin/python bench/dispatcher_memory.py --store postgres --observe 30
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from contextlib import ExitStack, suppress
from pathlib import Path
from typing import Any

import requests
from common import (
    Dispatcher,
    Executor,
    RegionConf,
    machine,
    noisy,
    pss_kb,
    status_kb,
    store_url,
    workdir,
    write_regions,
)

DISPATCHER_TARGET_MB = 200.0
EXECUTOR_TARGET_MB = 80.0
MAX_QUESTIONS = 10_000  # ES_MAX_JOB_QUESTIONS default


def mb(kb: float) -> float:
    return kb / 1024


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="M1: dispatcher RSS with 100,000 queued; executor worker RSS, no local model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--queued", type=int, default=100_000, help="executions in the job")
    parser.add_argument("--regions", type=int, default=2)
    parser.add_argument("--models", type=int, default=5)
    parser.add_argument("--slots", type=int, default=8, help="per region")
    parser.add_argument("--latency", type=float, default=5.0, help="executor latency, s")
    parser.add_argument("--observe", type=float, default=20.0, help="s of sampling")
    parser.add_argument("--requests", type=int, default=400, help="executor warm-up calls")
    parser.add_argument("--store", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--skip-executor", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the logs and the SQLite file")
    return parser


def snapshot(tree: dict[str, int]) -> dict[str, dict[str, int]]:
    out = {}
    for role, pid in tree.items():
        try:
            out[role] = status_kb(pid)
        except OSError:
            continue
    return out


def dispatcher_part(args: argparse.Namespace, tmp: Path) -> bool:
    per_job = args.regions * args.models
    questions = args.queued // per_job
    if questions > MAX_QUESTIONS or questions * per_job != args.queued:
        sys.exit(
            f"--queued must be a multiple of regions x models with <= {MAX_QUESTIONS} questions"
        )
    models = [f"sim-{i}" for i in range(args.models)]
    with ExitStack() as stack:
        ex = Executor(
            tmp,
            "slow",
            {m: {"provider": "simulated", "latency_s": args.latency} for m in models},
            threads=args.regions * args.slots,
        )
        stack.callback(ex.stop)
        ex.start()
        regions = {
            f"region-{i + 1}": RegionConf(ex.url, args.slots, tuple(models))
            for i in range(args.regions)
        }
        regions_file = write_regions(tmp / "regions.toml", regions)
        url = stack.enter_context(store_url(args.store, tmp))
        dispatcher = Dispatcher(tmp, url, regions_file)
        stack.callback(dispatcher.stop)
        dispatcher.start()
        api = dispatcher.api()
        api.queue()  # the API worker has served a request: its idle size
        time.sleep(1.0)
        tree = dispatcher.process_tree()
        idle = snapshot(tree)
        print(
            f"dispatcher: {args.store} store, {args.regions} regions x {args.slots} slots on one "
            f"executor ({ex.description}, latency {args.latency:g} s)"
        )
        started = time.monotonic()
        job = api.submit(
            {"questions": [f"question {i}" for i in range(questions)], "models": models}
        )
        print(f"submitted {job['total']} executions in {time.monotonic() - started:.1f} s")
        peak: dict[str, int] = {role: 0 for role in tree}
        last: dict[str, dict[str, int]] = {}
        end = time.monotonic() + args.observe
        queued = in_flight = 0
        while time.monotonic() < end:
            q = api.queue()
            api.job(job["id"])
            queued = sum(r["queued"] for r in q["regions"])
            in_flight = sum(r["in_flight"] for r in q["regions"])
            last = snapshot(tree)
            for role, values in last.items():
                peak[role] = max(peak[role], values["VmRSS"])
            time.sleep(1.0)
        print(f"after {args.observe:g} s: {queued} queued, {in_flight} in flight")
        api.cancel(job["id"])

    print(f"{'process':<22} {'idle RSS':>10} {'max RSS':>10} {'peak (HWM)':>11}  target")
    for role in tree:
        if role not in last:
            continue
        target = (
            f"{peak[role] / 1024 / DISPATCHER_TARGET_MB:.2f}x of 200 MB"
            if role == "region workers"
            else ""
        )
        print(
            f"{role:<22} {mb(idle[role]['VmRSS']):8.1f} MB {mb(peak[role]):8.1f} MB "
            f"{mb(last[role]['VmHWM']):9.1f} MB  {target}"
        )
    total_idle = sum(v["VmRSS"] for v in idle.values())
    total_max = sum(peak.values())
    print(
        f"{'all dispatcher procs':<22} {mb(total_idle):8.1f} MB {mb(total_max):8.1f} MB"
        f"{'':>12}  {mb(total_max) / DISPATCHER_TARGET_MB:.2f}x of 200 MB"
    )
    worker = mb(peak["region workers"])
    ok = worker <= DISPATCHER_TARGET_MB
    print(
        f"M1 dispatcher: region-worker process {worker:.1f} MB with ~{queued} queued "
        f"(idle baseline {mb(idle['region workers']['VmRSS']):.1f} MB, ratio "
        f"{worker / mb(idle['region workers']['VmRSS']):.2f}); all its processes together "
        f"{mb(total_max):.1f} MB; {'meets' if ok else 'MISSES'} the <= 200 MB target "
        f"(region workers{'' if mb(total_max) <= DISPATCHER_TARGET_MB else '; the total does not'})"
    )
    return ok


def hammer(url: str, n: int, threads: int) -> None:
    """``n`` calls from ``threads`` threads (errors ignored: this is warm-up, not a measure)."""
    body = {"model": "sim-0", "prompt": "How much memory does a worker use?"}
    per = max(1, n // threads)

    def loop() -> None:
        with requests.Session() as s:
            for _ in range(per):
                with suppress(requests.RequestException):
                    s.post(url + "/execute", json=body, timeout=30)

    pool = [threading.Thread(target=loop) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()


def executor_part(args: argparse.Namespace, tmp: Path) -> bool:
    ok = True
    models: dict[str, Any] = {
        "sim-0": {"provider": "simulated", "latency_s": 0.0},
        "sim-1": {"provider": "simulated", "latency_s": 1.0},
    }
    for worker_class, threads in (("gthread", 2), ("gevent", 1)):
        ex = Executor(
            tmp, f"mem-{worker_class}", models, workers=4, threads=threads,
            worker_class=worker_class,
        )  # fmt: skip
        try:
            ex.start()
            time.sleep(0.5)
            pids = ex.worker_pids()
            before = {pid: status_kb(pid)["VmRSS"] for pid in pids}
            hammer(ex.url, args.requests, 8)
            after = {pid: status_kb(pid) for pid in pids}
            pss = {pid: pss_kb(pid) for pid in pids}
        finally:
            ex.stop()
        worst = max(v["VmRSS"] for v in after.values())
        rows = ", ".join(
            f"{mb(before[p]):.1f} -> {mb(after[p]['VmRSS']):.1f} MB"
            + (f" (PSS {mb(pss_p):.1f})" if (pss_p := pss[p]) is not None else "")
            for p in pids
        )
        verdict = "meets" if mb(worst) <= EXECUTOR_TARGET_MB else "MISSES"
        ok &= mb(worst) <= EXECUTOR_TARGET_MB
        print(f"executor {ex.description}, simulated models only: workers RSS start -> after "
              f"{args.requests} calls: {rows}")  # fmt: skip
        print(
            f"M1 executor ({worker_class}): largest worker {mb(worst):.1f} MB = "
            f"{mb(worst) / EXECUTOR_TARGET_MB:.2f}x of 80 MB; {verdict} the <= 80 MB target"
        )
    return ok


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    print(f"machine: {machine()}")
    print(noisy())
    with workdir(args.keep) as tmp:
        dispatcher_part(args, tmp)
        if not args.skip_executor:
            executor_part(args, tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
