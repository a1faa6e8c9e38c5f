"""D2: how soon a failed call is retried in another, idle region, against the backoff.

Target (DESIGN.md): the retry starts <= backoff + 100 ms after the failure.

Region a's executor always fails (simulated 5xx); region b's answers and is idle.
Each sample is a one-execution job requested in a with failover "any": a's call
fails, the dispatcher schedules the retry after the backoff (jitter off,
``ES_BACKOFF_JITTER=none``, so the backoff is exactly ``--backoff`` for a first
failure), and b takes it from the global retry queue. The delay is read from the
attempts the store recorded (``GET /jobs/<id>/results``): attempt 2's
``started_at`` (in b) minus attempt 1's ``finished_at`` (in a); the baseline is
the configured backoff. a's circuit is kept closed (``ES_CIRCUIT_THRESHOLD``
very high), so a keeps taking the samples' first calls (an open circuit would
divert them to b untried); that b rather than a takes the retry is the store's
hand-off rule (a failover-any retry goes back to the region it failed in only
``ES_RETRY_HANDOFF_S`` after it is due). A retry that a takes back anyway is
reported and left out of the figures.

Two modes (``--modes``):

    same   one ``executor-service dispatcher`` runs both regions: the worker that
           records the failure wakes every region's claim loop exactly when the
           retry is due (in-process timer);
    split  two dispatcher processes on the same store, one per region (a with the
           API, b with ``--no-api``), as a second dispatcher host would be: on
           SQLite b learns of the retry only by polling the store every
           ES_CLAIM_POLL_S (default 0.05 s); on PostgreSQL a's commit NOTIFYs b,
           which wakes when the retry is due (try ``--claim-poll-s 2``: the poll
           no longer matters).

    .venv/bin/python bench/dispatcher_retry.py
    .venv/bin/python bench/dispatcher_retry.py --backoff 0.5 --samples 40 --store postgres
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from common import (
    Dispatcher,
    Executor,
    RegionConf,
    machine,
    median,
    noisy,
    store_url,
    wait_job_finished,
    workdir,
    write_regions,
)

MARGIN_S = 0.100
MODEL = "sim"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="D2: time from a failure to its retry in an idle region, vs the backoff.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--backoff", type=float, default=1.0, help="ES_BACKOFF_BASE_S, s")
    parser.add_argument("--samples", type=int, default=20, help="failures per mode")
    parser.add_argument("--modes", default="same,split", help="same and/or split")
    parser.add_argument("--latency", type=float, default=0.05, help="executors' latency, s")
    parser.add_argument("--store", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--claim-poll-s", type=float, help="ES_CLAIM_POLL_S (default: package's)")
    parser.add_argument("--keep", action="store_true", help="keep the logs and the SQLite file")
    return parser


def settings(args: argparse.Namespace) -> dict[str, str]:
    env = {
        "ES_BACKOFF_BASE_S": str(args.backoff),
        "ES_BACKOFF_JITTER": "none",
        # closed throughout: an open circuit would divert a's new work to b untried
        "ES_CIRCUIT_THRESHOLD": "1000000",
    }
    if args.claim_poll_s is not None:
        env["ES_CLAIM_POLL_S"] = str(args.claim_poll_s)
    return env


def sample(api: Any, index: int, timeout: float) -> dict[str, Any]:
    job = api.submit(
        {"questions": [f"d2 sample {index}"], "models": [MODEL], "regions": ["a"],
         "failover": "any", "max_attempts": 3}
    )  # fmt: skip
    wait_job_finished(api, job["id"], timeout)
    (execution,) = api.results(job["id"])["executions"]
    log = execution["attempt_log"]
    if len(log) < 2 or log[0]["region"] != "a" or log[0]["ok"]:
        raise RuntimeError(f"unexpected attempts: {log}")
    return {
        "delay": log[1]["started_at"] - log[0]["finished_at"],
        "retry_region": log[1]["region"],
        "state": execution["state"],
    }


def run_mode(
    mode: str, args: argparse.Namespace, tmp: Path, a: Executor, b: Executor
) -> list[float]:
    conf_a = RegionConf(a.url, 2, (MODEL,))
    conf_b = RegionConf(b.url, 2, (MODEL,))
    env = settings(args)
    delays: list[float] = []
    taken_back = 0
    with ExitStack() as stack:
        url = stack.enter_context(store_url(args.store, tmp))
        if mode == "same":
            both = write_regions(tmp / f"regions-{mode}.toml", {"a": conf_a, "b": conf_b})
            front = Dispatcher(tmp, url, both, env=env, name="dispatcher-ab")
            stack.callback(front.stop)
            front.start()
        else:
            only_a = write_regions(tmp / f"regions-{mode}-a.toml", {"a": conf_a})
            only_b = write_regions(tmp / f"regions-{mode}-b.toml", {"b": conf_b})
            front = Dispatcher(tmp, url, only_a, env=env, name="dispatcher-a")
            stack.callback(front.stop)
            front.start()
            back = Dispatcher(tmp, url, only_b, env=env, api=False, name="dispatcher-b")
            stack.callback(back.stop)
            back.start()
        api = front.api()
        for i in range(args.samples):
            r = sample(api, i, timeout=args.backoff * 4 + 30)
            excess = r["delay"] - args.backoff
            if r["retry_region"] != "b":
                taken_back += 1
                print(f"  {mode} #{i + 1}: retry taken back by {r['retry_region']}: not counted")
                continue
            delays.append(r["delay"])
            print(
                f"  {mode} #{i + 1}: retry started in b {r['delay'] * 1000:7.1f} ms after the "
                f"failure in a = backoff + {excess * 1000:5.1f} ms ({r['state']})",
                flush=True,
            )
            # b idle again; a random phase against b's poll timer, so samples are independent
            time.sleep(0.2 + random.uniform(0.0, 0.1))
    if taken_back:
        print(f"  {mode}: {taken_back} of {args.samples} retries were taken back by a")
    return delays


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - {"same", "split"}:
        sys.exit("--modes: same and/or split")
    print(f"machine: {machine()}")
    print(noisy())
    results: dict[str, list[float]] = {}
    with ExitStack() as stack:
        tmp = stack.enter_context(workdir(args.keep))
        failing = {
            MODEL: {"provider": "simulated", "latency_s": args.latency, "error_rate": 1.0,
                    "error_kind": "5xx", "status": 500}
        }  # fmt: skip
        healthy = {MODEL: {"provider": "simulated", "latency_s": args.latency}}
        a = Executor(tmp, "a", failing, threads=2)
        stack.callback(a.stop)
        b = Executor(tmp, "b", healthy, threads=2)
        stack.callback(b.stop)
        a.start()
        b.start()
        poll = args.claim_poll_s if args.claim_poll_s is not None else "default (0.1)"
        print(
            f"executors: a always fails (5xx), b answers in {args.latency:g} s; store "
            f"{args.store}; backoff {args.backoff:g} s, no jitter (the baseline); "
            f"ES_CLAIM_POLL_S {poll}"
        )
        for mode in modes:
            results[mode] = run_mode(mode, args, tmp, a, b)
    worst_ok = True
    for mode, delays in results.items():
        if not delays:
            print(f"D2 {mode}: no retry ran in b")
            worst_ok = False
            continue
        excess = [d - args.backoff for d in delays]
        ratio = max(delays) / (args.backoff + MARGIN_S)
        ok = max(excess) <= MARGIN_S
        worst_ok &= ok
        print(
            f"D2 {mode}: delay / backoff median {median(delays) / args.backoff:.3f}, "
            f"excess over the backoff median {median(excess) * 1000:.1f} ms, max "
            f"{max(excess) * 1000:.1f} ms over {len(delays)} retries; worst delay / "
            f"(backoff + 100 ms) = {ratio:.3f}; {'meets' if ok else 'MISSES'} the "
            f"<= backoff + 100 ms target"
        )
    verdict = "meets the target in every mode" if worst_ok else "MISSES the target in some mode"
    print(f"D2 overall: {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
