"""D4: the dispatcher's throughput with an instant executor, against the raw request rate.

Target (DESIGN.md): completed executions per second >= 0.5x the request rate the
same executor sustains from a plain client with the same concurrency, on SQLite
and on PostgreSQL.

The executor is a real gunicorn (gevent, ``--executor-workers`` workers) serving
simulated models with latency 0, so every figure is overhead: the dispatcher's
claim, HTTP call and result write per execution, or the plain client's HTTP call.

- Baseline: a plain client in this process, ``--concurrency`` threads sharing one
  ``requests`` session with a pool of that size (what the dispatcher's executor
  client uses), each posting the same ``/execute`` body in a loop; 200s counted
  over ``--duration`` s after ``--warmup`` s. Measured before the first
  dispatcher run and after each one (runs interleave: plain, SQLite, plain,
  PostgreSQL, plain, ... for ``--rounds`` rounds); a run's baseline is the mean
  of the two plain-client runs beside it (their gap shows how much the machine
  drifted), and each store's figure is the median of its runs' ratios.
- Dispatcher: the real ``executor-service dispatcher`` (package defaults) with one
  region of ``--concurrency`` slots, and one job big enough to outlast the
  measurement; ``succeeded`` is read from ``GET /jobs/<id>`` every 0.5 s, and the
  rate is taken over the same warm-up and duration. The job is then cancelled.
  The region-worker process's CPU use is printed too: at ~1 core it is bound
  by its own Python (one GIL for every region's threads).

- Peers (D4'), in the same run and interleaved the same way, each over the same
  executor with the same number of threads: Celery with a Redis broker
  (``bench/celery_peer.py``: acks_late, prefetch 1, thread pool, results in Redis;
  the broker at ``--redis``, a queue of this run's own) with its tasks queued
  before its worker starts, as the dispatcher's job is submitted before the
  count; and a plain ``ThreadPoolExecutor`` given every call up front (no
  durability at all: the floor of any queue in this process). Each prints its
  ratio to the plain client, and the dispatcher's ratio is also divided by
  Celery's (both normalised by their own neighbouring baselines).

    .venv/bin/python bench/dispatcher_throughput.py
    .venv/bin/python bench/dispatcher_throughput.py --stores sqlite --concurrency 32
    .venv/bin/python bench/dispatcher_throughput.py --peers ''          # stores only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, suppress
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests
from common import (
    REPO,
    Dispatcher,
    Executor,
    Process,
    RegionConf,
    clean_env,
    cpu_seconds,
    machine,
    median,
    noisy,
    pids_with_cmdline,
    store_url,
    wait_job_finished,
    workdir,
    write_regions,
)
from requests.adapters import HTTPAdapter

TARGET_RATIO = 0.9
PEERS = ("celery", "threadpool")
MAX_MODELS = 10
MAX_QUESTIONS = 10_000  # ES_MAX_JOB_QUESTIONS default
MAX_EXECUTIONS = 100_000  # ES_MAX_JOB_EXECUTIONS default
PROMPT = "What is the capital of France?"
POLL_S = 0.5


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="D4: dispatcher executions/s vs a plain client's requests/s, same executor.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--concurrency", type=int, default=16, help="client threads = slots")
    parser.add_argument("--executor-workers", type=int, default=2, help="gevent workers")
    parser.add_argument("--duration", type=float, default=6.0, help="measured seconds per run")
    parser.add_argument("--rounds", type=int, default=2, help="runs per store, interleaved")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--stores", default="sqlite,postgres", help="sqlite and/or postgres")
    parser.add_argument("--peers", default=",".join(PEERS), help="celery and/or threadpool")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/15", help="Celery's broker")
    parser.add_argument("--claim-poll-s", type=float, help="ES_CLAIM_POLL_S (default: package's)")
    parser.add_argument("--keep", action="store_true", help="keep the logs and the SQLite file")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    return parser


def executor_cpu(ex: Executor) -> float:
    """CPU seconds of the executor's worker processes so far."""
    return sum(cpu_seconds(pid) for pid in ex.worker_pids())


def plain_client(ex: Executor, concurrency: int, warmup: float, duration: float) -> dict[str, Any]:
    """Requests/s of ``concurrency`` threads posting /execute in a closed loop, with the CPU
    this process (the client) and the executor used over the measured window."""
    url = ex.url + "/execute"
    session = requests.Session()
    adapter = HTTPAdapter(pool_connections=1, pool_maxsize=concurrency, max_retries=0)
    session.mount("http://", adapter)
    session.headers["Content-Type"] = "application/json"
    start = time.monotonic()
    t0, t1 = start + warmup, start + warmup + duration
    counts = {"ok": 0, "other": 0}
    lock = threading.Lock()

    def loop(worker: int) -> None:
        i = 0
        while (now := time.monotonic()) < t1:
            body = {"model": "sim-0", "prompt": PROMPT, "request_id": f"plain.{worker}.{i}",
                    "timeout_s": 60.0}  # fmt: skip
            i += 1
            try:
                status = session.post(url, data=json.dumps(body), timeout=(5, 65)).status_code
            except requests.RequestException:
                status = 0
            if now >= t0 and time.monotonic() <= t1:
                with lock:
                    counts["ok" if status == 200 else "other"] += 1

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    time.sleep(max(0.0, t0 - time.monotonic()))
    cpu0, ex0 = time.process_time(), executor_cpu(ex)
    time.sleep(max(0.0, t1 - time.monotonic()))
    cpu1, ex1 = time.process_time(), executor_cpu(ex)
    for t in threads:
        t.join()
    session.close()
    ok = max(counts["ok"], 1)
    return {
        "rate": counts["ok"] / duration,
        **counts,
        "client_cores": (cpu1 - cpu0) / duration,
        "client_cpu_ms": 1000 * (cpu1 - cpu0) / ok,
        "executor_cores": (ex1 - ex0) / duration,
    }


def store_cpu(db_name: str | None) -> float:
    """CPU seconds so far of the PostgreSQL backends serving ``db_name`` (0 for SQLite:
    its work is done inside the dispatcher's processes)."""
    if db_name is None:
        return 0.0
    total = 0.0
    for pid in pids_with_cmdline(f" {db_name} "):
        with suppress(OSError):
            total += cpu_seconds(pid)
    return total


def describe(run: dict[str, Any]) -> str:
    return (
        f"{run['rate']:.1f} req/s ({run['other']} non-200); client {run['client_cores']:.2f} "
        f"cores, {run['client_cpu_ms']:.2f} ms CPU per request; executor "
        f"{run['executor_cores']:.2f} cores"
    )


def dispatcher_run(
    store: str,
    args: argparse.Namespace,
    tmp: Path,
    ex: Executor,
    models: list[str],
    size: int,
) -> dict[str, Any]:
    n_models = min(MAX_MODELS, max(1, math.ceil(size / MAX_QUESTIONS)))
    questions = min(MAX_QUESTIONS, math.ceil(size / n_models))
    env = {} if args.claim_poll_s is None else {"ES_CLAIM_POLL_S": str(args.claim_poll_s)}
    with ExitStack() as stack:
        url = stack.enter_context(store_url(store, tmp))
        regions = write_regions(
            tmp / f"regions-{store}.toml",
            {"solo": RegionConf(ex.url, args.concurrency, tuple(models[:n_models]))},
        )
        dispatcher = Dispatcher(tmp, url, regions, env=env, name=f"dispatcher-{store}")
        stack.callback(dispatcher.stop)
        dispatcher.start()
        api = dispatcher.api()
        submit_started = time.monotonic()
        job = api.submit(
            {"questions": [f"q{i}" for i in range(questions)], "models": models[:n_models]}
        )
        submit_s = time.monotonic() - submit_started
        t_start = time.monotonic()
        # (time, succeeded, region-worker CPU s, API CPU s, executor CPU s, PostgreSQL CPU s)
        samples: list[tuple[float, int, float, float, float, float]] = []
        tree = dispatcher.process_tree()
        worker_pid = tree["region workers"]
        api_pids = [p for role, p in tree.items() if role.startswith("API")]
        # PostgreSQL backends serving this database (their titles name it): the store's CPU
        db_name = urlsplit(url).path.lstrip("/") if store == "postgres" else None
        finished_early = False
        metrics_first: dict[str, float] = {}
        metrics_last: dict[str, float] = {}
        while True:
            now = time.monotonic()
            view = api.job(job["id"])
            done = view["states"].get("succeeded", 0)
            if now - t_start >= args.warmup:
                metrics_now = dispatcher.metric_totals()
                metrics_first = metrics_first or metrics_now
                metrics_last = metrics_now
                samples.append(
                    (
                        time.monotonic(),
                        done,
                        cpu_seconds(worker_pid),
                        sum(cpu_seconds(p) for p in api_pids),
                        executor_cpu(ex),
                        store_cpu(db_name),
                    )
                )
            if view["state"] == "finished":
                finished_early = True
                break
            if now - t_start >= args.warmup + args.duration:
                break
            time.sleep(POLL_S)
        api.cancel(job["id"])
        final = wait_job_finished(api, job["id"], timeout=120)["states"]
    (ta, da, ca, aa, ea, sa), (tb, db, cb, ab, eb, sb) = samples[0], samples[-1]

    def delta(name: str) -> float:
        return metrics_last.get(name, 0.0) - metrics_first.get(name, 0.0)

    claims = max(delta("dispatcher_claim_seconds_count"), 1.0)
    calls = max(delta("dispatcher_call_seconds_count"), 1.0)
    return {
        "store": store,
        "rate": (db - da) / (tb - ta),
        "window_s": tb - ta,
        "executions_in_window": db - da,
        "worker_cores": (cb - ca) / (tb - ta),
        "cpu_ms_per_execution": 1000 * (cb - ca) / max(db - da, 1),
        "api_cores": (ab - aa) / (tb - ta),
        "executor_cores": (eb - ea) / (tb - ta),
        "postgres_cores": (sb - sa) / (tb - ta),
        # the region's claim loop: how often it claimed, how long a claim took, and how
        # busy that one thread was (1.0: claiming back to back, the loop is the limit)
        "claims_per_s": claims / (tb - ta),
        "claim_ms": 1000 * delta("dispatcher_claim_seconds_sum") / claims,
        "claimed_per_claim": delta("dispatcher_claimed_total") / claims,
        "claim_loop_busy": delta("dispatcher_claim_seconds_sum") / (tb - ta),
        # one call as the dispatcher's client saw it (HTTP round trip only)
        "call_ms": 1000 * delta("dispatcher_call_seconds_sum") / calls,
        # group commit: results written per result transaction
        "results_per_commit": delta("dispatcher_result_writes_total")
        / max(delta("dispatcher_result_commits_total"), 1.0),
        # a slot's whole cycle per execution: slots / rate
        "slot_cycle_ms": 1000 * args.concurrency / max((db - da) / (tb - ta), 1e-9),
        "job_total": job["total"],
        "submit_s": submit_s,
        "finished_early": finished_early,
        "final_states": final,
    }


def describe_dispatcher(r: dict[str, Any]) -> str:
    return (
        f"dispatcher ({r['store']}, round {r['round']}): {r['rate']:.1f} executions/s over "
        f"{r['window_s']:.1f} s ({r['executions_in_window']} succeeded); region-worker "
        f"process {r['worker_cores']:.2f} cores, {r['cpu_ms_per_execution']:.2f} ms CPU "
        f"per execution; API {r['api_cores']:.2f} cores; executor "
        f"{r['executor_cores']:.2f} cores; PostgreSQL backends {r['postgres_cores']:.2f} "
        f"cores; job of {r['job_total']} took {r['submit_s']:.2f} s to submit"
        f"\n    claim loop: {r['claims_per_s']:.0f} claims/s of "
        f"{r['claimed_per_claim']:.2f} executions, {r['claim_ms']:.2f} ms each "
        f"(loop busy {r['claim_loop_busy']:.0%}); one slot's cycle "
        f"{r['slot_cycle_ms']:.1f} ms per execution, of which the HTTP call "
        f"{r['call_ms']:.1f} ms; {r['results_per_commit']:.1f} results per result commit"
        + ("; JOB FINISHED EARLY (rate over a shorter window)" if r["finished_early"] else "")
    )


def execute_body(tag: str, i: int) -> str:
    return json.dumps({"model": "sim-0", "prompt": PROMPT, "request_id": f"{tag}.{i}",
                       "timeout_s": 60.0})  # fmt: skip


def count_window(
    done: Any, warmup: float, duration: float, cpu_pids: dict[str, list[int]]
) -> dict[str, Any]:
    """Rate of ``done()`` (a completion count) over [first completion + warmup, + duration],
    with the CPU of each group of ``cpu_pids`` over the same window."""
    deadline = time.monotonic() + 60
    while done() == 0:
        if time.monotonic() > deadline:
            raise RuntimeError("no call finished within 60 s")
        time.sleep(0.01)
    time.sleep(warmup)

    def cpu() -> dict[str, float]:
        out = {}
        for role, pids in cpu_pids.items():
            total = 0.0
            for pid in pids:
                with suppress(OSError):
                    total += cpu_seconds(pid)
            out[role] = total
        return out

    t0, d0, c0 = time.monotonic(), done(), cpu()
    time.sleep(duration)
    t1, d1, c1 = time.monotonic(), done(), cpu()
    window = t1 - t0
    return {
        "rate": (d1 - d0) / window,
        "window_s": window,
        "executions_in_window": d1 - d0,
        **{f"{role}_cores": (c1[role] - c0[role]) / window for role in cpu_pids},
    }


def threadpool_run(args: argparse.Namespace, ex: Executor, size: int) -> dict[str, Any]:
    """A plain ThreadPoolExecutor of ``concurrency`` threads given ``size`` calls up front."""
    url = ex.url + "/execute"
    session = requests.Session()
    session.mount(
        "http://", HTTPAdapter(pool_connections=1, pool_maxsize=args.concurrency, max_retries=0)
    )
    session.headers["Content-Type"] = "application/json"
    finished = [0]
    lock = threading.Lock()

    def call(i: int) -> None:
        with suppress(requests.RequestException):
            if session.post(url, data=execute_body("pool", i), timeout=(5, 65)).ok:
                with lock:
                    finished[0] += 1

    pool = ThreadPoolExecutor(args.concurrency, thread_name_prefix="peer")
    try:
        for i in range(size):
            pool.submit(call, i)
        run = count_window(
            lambda: finished[0], args.warmup, args.duration,
            {"client": [os.getpid()], "executor": ex.worker_pids()},
        )  # fmt: skip
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        session.close()
    return {"store": "threadpool", **run}


def celery_run(args: argparse.Namespace, tmp: Path, ex: Executor, size: int) -> dict[str, Any]:
    """Celery (bench/celery_peer.py) on the Redis broker: ``size`` tasks queued, then a
    worker of ``concurrency`` threads started, completions counted in Redis."""
    import redis
    from celery import Celery

    tag = uuid.uuid4().hex[:8]
    queue, counter = f"bench-peer-{tag}", f"bench-peer-done-{tag}"
    r = redis.Redis.from_url(args.redis)
    r.ping()
    producer_app = Celery("bench-producer", broker=args.redis, backend=args.redis)
    producer_app.conf.update(task_serializer="json", broker_connection_retry_on_startup=True)
    url = ex.url + "/execute"
    task_ids: list[str] = []
    started = time.monotonic()
    with producer_app.producer_or_acquire() as producer:
        for i in range(size):
            result = producer_app.send_task(
                "bench.execute", args=[url, execute_body(f"celery-{tag}", i)],
                queue=queue, producer=producer,
            )  # fmt: skip
            task_ids.append(result.id)
    submit_s = time.monotonic() - started
    env = {
        **clean_env(),
        "PYTHONPATH": str(REPO / "bench"),
        "BENCH_CELERY_BROKER": args.redis,
        "BENCH_CELERY_QUEUE": queue,
        "BENCH_CELERY_COUNTER": counter,
        "BENCH_CELERY_THREADS": str(args.concurrency),
    }
    argv = [sys.executable, "-m", "celery", "-A", "celery_peer", "worker", "--pool", "threads",
            "--concurrency", str(args.concurrency), "--prefetch-multiplier", "1", "-Q", queue,
            "--without-gossip", "--without-mingle", "--without-heartbeat",
            "--loglevel", "WARNING", "--hostname", f"bench-{tag}@%h"]  # fmt: skip
    worker = Process("celery worker", argv, env, tmp / f"celery-{tag}.log")
    redis_pids = [p for p in pids_with_cmdline("redis-server") if p != os.getpid()]
    try:
        worker.spawn()
        run = count_window(
            lambda: int(r.get(counter) or 0), args.warmup, args.duration,
            {"worker": [worker.pid], "executor": ex.worker_pids(), "redis": redis_pids},
        )  # fmt: skip
    except RuntimeError as exc:
        raise RuntimeError(f"{exc}; celery worker log:\n{worker.log_tail()}") from exc
    finally:
        r.delete(queue)  # what is left of the queue: the warm shutdown then ends at once
        worker.stop()
        keys = [counter, queue, *(f"celery-task-meta-{t}" for t in task_ids)]
        for i in range(0, len(keys), 1000):
            r.delete(*keys[i : i + 1000])
    return {"store": "celery", "submit_s": submit_s, "job_total": size, **run}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    if not stores or set(stores) - {"sqlite", "postgres"}:
        sys.exit("--stores: sqlite and/or postgres")
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    if set(peers) - set(PEERS):
        sys.exit("--peers: celery and/or threadpool (or '' for none)")
    print(f"machine: {machine()}")
    print(noisy())
    runs: list[dict[str, Any]] = []
    with ExitStack() as stack:
        tmp = stack.enter_context(workdir(args.keep))
        models = [f"sim-{i}" for i in range(MAX_MODELS)]
        ex = Executor(
            tmp,
            "solo",
            {m: {"provider": "simulated", "latency_s": 0.0} for m in models},
            workers=args.executor_workers,
            worker_class="gevent",
        )
        stack.callback(ex.stop)
        ex.start()
        print(
            f"executor: {ex.description}, simulated latency 0; concurrency {args.concurrency}; "
            f"{args.warmup:g} s warm-up + {args.duration:g} s measured"
        )
        baselines = [plain_client(ex, args.concurrency, args.warmup, args.duration)]
        print(f"baseline (plain client) #1: {describe(baselines[0])}", flush=True)
        # big enough to outlast warm-up + duration even at the plain client's rate
        size = int(baselines[0]["rate"] * (args.warmup + args.duration) * 1.3) + 1000
        size = min(MAX_EXECUTIONS, max(20_000, size))
        # the peers get the same margin over the plain client's rate (they cannot be
        # cancelled as cheaply as a job: no more than they need)
        peer_size = int(baselines[0]["rate"] * (args.warmup + args.duration) * 1.5) + 2000
        kinds = [*stores, *peers]
        sequence = [kind for _ in range(args.rounds) for kind in kinds]
        for n, kind in enumerate(sequence, start=1):
            round_no = (n - 1) // len(kinds) + 1
            if kind in PEERS:
                if kind == "celery":
                    r = celery_run(args, tmp, ex, peer_size)
                    extra = (f"celery worker {r['worker_cores']:.2f} cores, redis-server "
                             f"{r['redis_cores']:.2f} cores; {r['job_total']} tasks took "
                             f"{r['submit_s']:.2f} s to queue")  # fmt: skip
                else:
                    r = threadpool_run(args, ex, peer_size)
                    extra = f"this process {r['client_cores']:.2f} cores"
                r["round"] = round_no
                runs.append(r)
                print(
                    f"peer ({kind}, round {round_no}): {r['rate']:.1f} calls/s over "
                    f"{r['window_s']:.1f} s ({r['executions_in_window']} done); {extra}; "
                    f"executor {r['executor_cores']:.2f} cores",
                    flush=True,
                )
            else:
                store = kind
                r = dispatcher_run(store, args, tmp, ex, models, size)
                r["round"] = round_no
                runs.append(r)
                print(describe_dispatcher(r), flush=True)
            # a baseline after every run: each run is compared with the two
            # plain-client runs beside it, so drift in the machine's load hits both
            baselines.append(plain_client(ex, args.concurrency, args.warmup, args.duration))
            print(
                f"baseline (plain client) #{len(baselines)}: {describe(baselines[-1])}",
                flush=True,
            )
    for i, r in enumerate(runs):
        left, right = baselines[i]["rate"], baselines[i + 1]["rate"]
        r["baseline"] = (left + right) / 2
        r["ratio"] = r["rate"] / r["baseline"]
        r["baseline_gap"] = abs(left - right) / r["baseline"]
        print(
            f"  {r['store']} round {r['round']}: {r['rate']:.1f} executions/s / "
            f"{r['baseline']:.1f} req/s (plain client just before and after: {left:.1f}, "
            f"{right:.1f}; gap {r['baseline_gap']:.0%}) = {r['ratio']:.2f}x"
        )
    medians = {k: median([r["ratio"] for r in runs if r["store"] == k]) for k in kinds}
    for store in stores:
        ratios = [r["ratio"] for r in runs if r["store"] == store]
        verdict = "meets" if medians[store] >= TARGET_RATIO else "MISSES"
        print(
            f"D4 {store}: dispatcher / plain client = {medians[store]:.2f}x (median of "
            f"{len(ratios)} runs: {', '.join(f'{x:.2f}' for x in ratios)}); {verdict} the "
            f">= {TARGET_RATIO} target"
        )
    for peer in peers:
        ratios = [r["ratio"] for r in runs if r["store"] == peer]
        against = "; ".join(
            f"dispatcher ({store}) / {peer} = {medians[store] / medians[peer]:.2f}x"
            for store in stores
        )
        print(
            f"D4' {peer}: {peer} / plain client = {medians[peer]:.2f}x (median of "
            f"{len(ratios)} runs: {', '.join(f'{x:.2f}' for x in ratios)}); {against}"
        )
    if args.json:
        args.json.write_text(
            json.dumps({"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
                        "baselines": baselines, "runs": runs}, indent=2)
        )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
