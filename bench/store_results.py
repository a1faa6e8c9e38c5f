"""The result path alone: results/s that 16 threads write into a store, one transaction per
result (as before group commit) against group commit (store/group_commit.py), and on
SQLite group commit at synchronous=FULL against NORMAL (what the store does).

No executor, no dispatcher: ``--results`` executions are created and leased in one
claim, then ``--threads`` threads complete them all as fast as the store takes them.
This isolates the write path D4 spends a slot's cycle on; D4 itself
(bench/dispatcher_throughput.py) is the end-to-end figure.

    .venv/bin/python bench/store_results.py                      # SQLite and PostgreSQL
    .venv/bin/python bench/store_results.py --stores sqlite --results 5000
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from common import store_url, workdir

from executor_service.dispatcher.rules import ClaimRequest
from executor_service.dispatcher.store import open_store
from executor_service.dispatcher.store.base import Claim, NewJob, RegionSpec
from executor_service.dispatcher.store.sql_store import SQLStore

T0 = 1_000.0


def variants(kind: str) -> list[str]:
    if kind == "sqlite":
        return ["one transaction per result (FULL)", "group commit, FULL", "group commit, NORMAL"]
    return ["one transaction per result", "group commit"]


def writer(store: SQLStore[Any], variant: str) -> Callable[[Claim], bool]:
    if variant.startswith("one transaction"):

        def alone(c: Claim) -> bool:
            args = {"id": c.execution_id, "token": c.token, "output": "x",
                    "result": store._dumps({"output": "x"}), "now": T0 + 1}  # fmt: skip
            with store._transaction(write=True) as db:
                return store._finish_attempt(db, "complete", args, T0, error=None)

        return alone
    if variant == "group commit, FULL":
        store.results._transaction = lambda: store._transaction(write=True)  # type: ignore[method-assign]
    return lambda c: store.complete(c.execution_id, c.token, {"output": "x"}, T0 + 1, T0)


def run(url: str, variant: str, results: int, threads: int) -> tuple[float, float]:
    store = open_store(url)
    assert isinstance(store, SQLStore)
    try:
        region = RegionSpec("r1", concurrency=results, models=frozenset({"m1"}))
        job = NewJob(tenant="t", questions=[f"q{i}" for i in range(results)], models=["m1"],
                     regions_by_model={"m1": ["r1"]})  # fmt: skip
        store.create_job(job, T0)
        claims = store.claim(ClaimRequest(region, limit=results, now=T0, lease_s=3600.0,
                                          worker="bench", tenant_batch=results))  # fmt: skip
        write = writer(store, variant)
        chunks = [claims[i::threads] for i in range(threads)]
        started = time.perf_counter()
        workers = [threading.Thread(target=lambda ch=ch: [write(c) for c in ch]) for ch in chunks]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        elapsed = time.perf_counter() - started
        group = store.results
        return len(claims) / elapsed, group.ops / max(group.batches, 1)
    finally:
        store.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stores", default="sqlite,postgres")
    parser.add_argument("--results", type=int, default=3000)
    parser.add_argument("--threads", type=int, default=16)
    args = parser.parse_args(argv)
    print(f"load average {os.getloadavg()[0]:.2f}; {args.results} results, {args.threads} threads")
    with ExitStack() as stack:
        tmp: Path = stack.enter_context(workdir())
        for kind in [s.strip() for s in args.stores.split(",") if s.strip()]:
            for variant in variants(kind):
                with store_url(kind, tmp) as url:
                    rate, per_commit = run(url, variant, args.results, args.threads)
                grouped = f" ({per_commit:.1f} results per commit)" if "group" in variant else ""
                print(f"{kind:8s} {variant:34s} {rate:8.0f} results/s{grouped}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
