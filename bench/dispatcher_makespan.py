"""D1: the makespan of a job, as a ratio to its lower bound.

Target (DESIGN.md): the seed scenario scaled (3 regions serving 2/3/3 models, 8
questions) finishes within 1.10x the lower bound, the slowest region's work
divided by its slots: ``max over regions of executions x latency / concurrency``.
Regions never wait for each other, so the region with the most work per slot
sets the pace, and everything above the bound is the dispatcher's own cost
(claim polling, store writes, HTTP set-up) or slots left idle.

Each region's executor is a real gunicorn (gthread, 1 worker x as many threads as
the region's slots) serving simulated models with that region's latency
(default 0.2 / 0.3 / 0.4 s). The dispatcher is the real ``executor-service
dispatcher`` command with the package defaults (ES_CLAIM_POLL_S 0.1 unless
``--claim-poll-s``); the job goes in through ``POST /jobs``. The makespan runs
from the job's ``created_at`` (the API's clock when it accepted the job) to the
last attempt's ``finished_at``; both clocks are this machine's ``time.time()``.
Several rounds run one after another on the same processes; the baseline
(the lower bound) is computed from the same run's configuration.

    .venv/bin/python bench/dispatcher_makespan.py
    .venv/bin/python bench/dispatcher_makespan.py --store postgres --rounds 5
    .venv/bin/python bench/dispatcher_makespan.py --latencies 0.1,0.1,0.1 --slots 2,2,2
"""

from __future__ import annotations

import argparse
import sys
from contextlib import ExitStack
from typing import Any

from common import (
    Dispatcher,
    Executor,
    RegionConf,
    attempts,
    machine,
    median,
    noisy,
    store_url,
    wait_job_finished,
    workdir,
    write_regions,
)

TARGET_RATIO = 1.10
REGION_NAMES = ("us-east", "eu-west", "asia-pacific")
MODELS = ("sim-a", "sim-b", "sim-c")


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="D1: job makespan vs the slowest region's work / its slots.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--latencies", type=floats, default=[0.2, 0.3, 0.4], help="s per region")
    parser.add_argument("--slots", type=ints, default=[4, 4, 4], help="concurrency per region")
    parser.add_argument(
        "--models-served", type=ints, default=[2, 3, 3], help="models served per region (<= 3)"
    )
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5, help="jobs, one after another")
    parser.add_argument("--store", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--claim-poll-s", type=float, help="ES_CLAIM_POLL_S (default: package's)")
    parser.add_argument("--keep", action="store_true", help="keep the logs and the SQLite file")
    return parser


def one_round(api: Any, questions: int, regions: dict[str, RegionConf]) -> dict[str, Any]:
    job = api.submit(
        {"questions": [f"q{i}: what is {i} + {i}?" for i in range(questions)],
         "models": list(MODELS)}
    )  # fmt: skip
    wait_job_finished(api, job["id"], timeout=300)
    executions = api.results(job["id"])["executions"]
    bad = [e for e in executions if e["state"] != "succeeded" or e["attempts"] != 1]
    tries = attempts(executions)
    start = min(a["started_at"] for a in tries)
    end = max(a["finished_at"] for a in tries)
    per_region: dict[str, float] = {}
    for region in regions:
        mine = [a for a in tries if a["region"] == region]
        per_region[region] = max(a["finished_at"] for a in mine) - job["created_at"]
    return {
        "makespan": end - job["created_at"],
        "first_start": start - job["created_at"],
        "from_first_start": end - start,
        "per_region": per_region,
        "not_clean": len(bad),
        "executions": len(executions),
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    n = len(REGION_NAMES)
    if not (len(args.latencies) == len(args.slots) == len(args.models_served) == n):
        sys.exit(f"--latencies, --slots and --models-served take {n} values each")
    served = {r: MODELS[:k] for r, k in zip(REGION_NAMES, args.models_served, strict=True)}
    work = {r: args.questions * len(served[r]) for r in REGION_NAMES}
    bound_by_region = {
        r: work[r] * lat / slots
        for r, lat, slots in zip(REGION_NAMES, args.latencies, args.slots, strict=True)
    }
    bound = max(bound_by_region.values())
    env = {} if args.claim_poll_s is None else {"ES_CLAIM_POLL_S": str(args.claim_poll_s)}

    print(f"machine: {machine()}")
    print(noisy())
    with ExitStack() as stack:
        tmp = stack.enter_context(workdir(args.keep))
        regions: dict[str, RegionConf] = {}
        for region, lat, slots in zip(REGION_NAMES, args.latencies, args.slots, strict=True):
            models = {m: {"provider": "simulated", "latency_s": lat} for m in served[region]}
            ex = Executor(tmp, region, models, workers=1, threads=slots)
            stack.callback(ex.stop)
            ex.start()
            regions[region] = RegionConf(ex.url, slots, served[region])
            print(
                f"region {region:<13} {ex.description}, models {list(served[region])}, "
                f"latency {lat:g} s, {slots} slots: {work[region]} executions, "
                f"bound {bound_by_region[region]:.3f} s"
            )
        regions_file = write_regions(tmp / "regions.toml", regions)
        url = stack.enter_context(store_url(args.store, tmp))
        dispatcher = Dispatcher(tmp, url, regions_file, env=env)
        stack.callback(dispatcher.stop)
        dispatcher.start()
        print(
            f"dispatcher: {args.store} store, ES_CLAIM_POLL_S "
            f"{args.claim_poll_s if args.claim_poll_s is not None else 'default (0.1)'}; "
            f"job: {args.questions} questions x {len(MODELS)} models -> {sum(work.values())} "
            f"executions"
        )
        print(f"lower bound (baseline): {bound:.3f} s")
        api = dispatcher.api()
        results = []
        for round_no in range(args.rounds):
            r = one_round(api, args.questions, regions)
            results.append(r)
            per_region = ", ".join(
                f"{name} {t:.3f} s ({t / bound_by_region[name]:.2f}x its bound)"
                for name, t in r["per_region"].items()
            )
            print(
                f"round {round_no + 1}: makespan {r['makespan']:.3f} s = "
                f"{r['makespan'] / bound:.3f}x the bound; first call started "
                f"{r['first_start'] * 1000:.0f} ms after submit; first start to last end "
                f"{r['from_first_start']:.3f} s; per region: {per_region}; "
                f"not clean (failed or retried): {r['not_clean']}/{r['executions']}"
            )
    ratios = [r["makespan"] / bound for r in results]
    med = median(ratios)
    verdict = "meets" if med <= TARGET_RATIO else "MISSES"
    print(
        f"D1 makespan / lower bound: median {med:.3f} over {len(ratios)} rounds "
        f"(min {min(ratios):.3f}, max {max(ratios):.3f}); {verdict} the <= {TARGET_RATIO} target"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
