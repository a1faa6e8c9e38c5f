"""One claim alone: ms per claim, statements (round trips on PostgreSQL) per claim and
the time spent in each statement, on each store. No executor, no dispatcher.

The D4 shape: one region of ``--slots`` seats serving one model, one tenant's job big
enough for every claim, no retries. ``--slots - --batch`` executions stay leased the
whole time (the region's other calls in flight), and each claim takes ``--batch``
(what the claim loop finds free in D4: 3-5), which are then completed outside the
timing, so the next claim finds its seats free. One thread: this is the cost of the
claim itself, not its wait for the region's lock or the store's.

    .venv/bin/python bench/store_claims.py                      # SQLite and PostgreSQL
    .venv/bin/python bench/store_claims.py --stores postgres --claims 2000
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from common import store_url, workdir

from executor_service.dispatcher.rules import ClaimRequest
from executor_service.dispatcher.store import open_store
from executor_service.dispatcher.store.base import NewJob, RegionSpec
from executor_service.dispatcher.store.sql_store import SQLStore

T0 = 1_000.0


ACTIVE = [False]  # statements are counted only inside the timed claims


class Counting:
    """Wraps a transaction's handle: counts and times every statement by query name."""

    def __init__(self, handle: Any, names: dict[str, str], stats: dict[str, list[float]]):
        self.handle, self.names, self.stats = handle, names, stats

    def execute(self, query: str, params: Any = (), /) -> Any:
        started = time.perf_counter()
        try:
            return self.handle.execute(query, params)
        finally:
            if ACTIVE[0]:
                name = self.names.get(query, query.split()[0].lower())
                self.stats[name].append(time.perf_counter() - started)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.handle, name)


def count_round_trips(stats: dict[str, list[float]]) -> None:
    """PostgreSQL: every blocking exchange with the server goes through Connection.wait
    (one per statement, or one per pipeline sync): count them as round trips."""
    import psycopg

    original = psycopg.Connection.wait

    def wait(self: Any, gen: Any, *a: Any, **kw: Any) -> Any:
        if ACTIVE[0]:
            stats["_round_trips"].append(0.0)
        return original(self, gen, *a, **kw)

    psycopg.Connection.wait = wait  # type: ignore[method-assign]


def instrument(store: SQLStore[Any], stats: dict[str, list[float]]) -> None:
    names = {sql: name for name, sql in store.queries.items()}
    if type(store).__name__ == "PostgresStore":
        count_round_trips(stats)
    for attr in ("_claim_transaction", "_transaction"):
        original = getattr(store, attr, None)
        if original is None:
            continue

        def wrapped(*a: Any, _original: Any = original, **kw: Any) -> Any:
            @contextmanager
            def counted() -> Iterator[Any]:
                with _original(*a, **kw) as handle:
                    yield Counting(handle, names, stats)
                    started = time.perf_counter()
                if ACTIVE[0]:
                    stats["commit"].append(time.perf_counter() - started)

            return counted()

        setattr(store, attr, wrapped)


def run(url: str, slots: int, batch: int, claims: int) -> dict[str, Any]:
    store = open_store(url)
    assert isinstance(store, SQLStore)
    try:
        total = (slots - batch) + batch * (claims + 50)
        region = RegionSpec("r1", concurrency=slots, models=frozenset({"m1"}))
        job = NewJob(tenant="t", questions=[f"q{i}" for i in range(total)], models=["m1"],
                     regions_by_model={"m1": ["r1"]})  # fmt: skip
        store.create_job(job, T0)

        def request(limit: int) -> ClaimRequest:
            return ClaimRequest(region, limit=limit, now=T0, lease_s=3600.0, worker="bench",
                                tenant_batch=slots)  # fmt: skip

        store.claim(request(slots - batch))  # the region's other calls in flight
        for _ in range(50):  # warm-up
            for c in store.claim(request(batch)):
                store.complete(c.execution_id, c.token, {"output": "x"}, T0 + 1, T0)
        stats: dict[str, list[float]] = defaultdict(list)
        instrument(store, stats)
        times, sizes = [], Counter[int]()
        statements = []
        for _ in range(claims):
            before = sum(len(v) for k, v in stats.items() if not k.startswith("_"))
            ACTIVE[0] = True
            started = time.perf_counter()
            got = store.claim(request(batch))
            times.append(time.perf_counter() - started)
            ACTIVE[0] = False
            sizes[len(got)] += 1
            statements.append(
                sum(len(v) for k, v in stats.items() if not k.startswith("_")) - before
            )
            for c in got:
                store.complete(c.execution_id, c.token, {"output": "x"}, T0 + 1, T0)
        return {"times": times, "sizes": sizes, "stats": stats, "statements": statements}
    finally:
        store.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stores", default="sqlite,postgres")
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--claims", type=int, default=1000)
    args = parser.parse_args()
    print(f"load average: {os.getloadavg()[0]:.2f}", flush=True)
    with ExitStack() as stack:
        tmp = stack.enter_context(workdir())
        for kind in args.stores.split(","):
            url = stack.enter_context(store_url(kind, tmp))
            out = run(url, args.slots, args.batch, args.claims)
            times = sorted(out["times"])
            stats = out["stats"]
            per_claim = statistics.mean(out["statements"])
            print(f"\n{kind}: {args.claims} claims of {args.batch} (seats {args.slots}), "
                  f"sizes {dict(out['sizes'])}")  # fmt: skip
            print(f"  ms per claim: median {1000 * statistics.median(times):.3f}, "
                  f"p90 {1000 * times[int(0.9 * len(times))]:.3f}; "
                  f"statements per claim (commit included): {per_claim:.1f}")  # fmt: skip
            n = args.claims
            if stats.get("_round_trips"):
                print(f"  round trips per claim: {len(stats.pop('_round_trips')) / n:.1f} "
                      "(pipelined statements are not timed one by one)")  # fmt: skip
            for name, spent in sorted(stats.items(), key=lambda kv: -sum(kv[1])):
                print(f"  {name:24s} {len(spent) / n:5.2f}/claim  "
                      f"{1000 * sum(spent) / n:7.3f} ms/claim")  # fmt: skip
            inside = sum(sum(v) for v in stats.values()) / n
            # on PostgreSQL the pipelines' time is in "outside SQL"
            print(
                f"  {'(Python, outside SQL)':24s}        "
                f"{1000 * (statistics.mean(times) - inside):7.3f} ms/claim"
            )
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
