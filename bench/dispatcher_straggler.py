"""D1 with a straggler: a job's makespan with and without hedged calls, in the same run.

The seed scenario scaled as in D1 (3 regions serving 2/3/3 models, 8 questions, 64
executions), where one model has a heavy tail: a share ``--tail-rate`` (3%) of its
calls, drawn per call, take ``--tail-s`` (6 s) instead of the region's latency. With
``--one-straggler``, instead, exactly one call per job straggles (the first call of
question q7 to sim-c in asia-pacific): that is 1 in 8 of that (region, model)'s calls,
so its observed p95 is the straggler's own latency and nothing is hedged (measured: see
docs/benchmarks-dispatcher.md); a tail of 5% or more does the same. Without
hedging, a job is as slow as its slowest call; with hedging (ES_HEDGE=1, defaults
otherwise: p95 trigger, tail of 10%, budget 5% of the job's calls), a straggler near
the end gets a second copy and the first answer wins.

Two dispatchers run side by side on the same executors, each with its own SQLite store:
one with hedging off, one with it on; their jobs alternate, one at a time, and each job
starts with every executor idle (a straggler left running by the previous job, hedged
or not, has ended), so both see the same machine. The first ``--warmup`` jobs of each
are not counted: a process hedges only once it has seen 20 answers of a (region,
model) (its p95). Figures are ratios within the run (a shared 2-core machine):
makespan with / without hedging (median and worst job), and extra calls sent.

    .venv/bin/python bench/dispatcher_straggler.py
    .venv/bin/python bench/dispatcher_straggler.py --rounds 10 --tail-rate 0.1
"""

from __future__ import annotations

import argparse
import sys
from contextlib import ExitStack
from typing import Any

import requests
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
from localserver import wait_until

REGIONS = {"us-east": (0.2, 4, 2), "eu-west": (0.3, 4, 3), "asia-pacific": (0.4, 4, 3)}
MODELS = ("sim-a", "sim-b", "sim-c")
STRAGGLER = "sim-c"  # served in eu-west and asia-pacific


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="D1 with one heavy-tail model: makespan with and without hedging.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=8, help="counted jobs per dispatcher")
    parser.add_argument("--warmup", type=int, default=3, help="uncounted jobs per dispatcher")
    parser.add_argument("--tail-rate", type=float, default=0.03, help="straggling sim-c calls")
    parser.add_argument("--one-straggler", action="store_true", help="q7 x sim-c x asia only")
    parser.add_argument("--tail-s", type=float, default=6.0, help="a straggler's latency")
    parser.add_argument("--keep", action="store_true", help="keep the logs and the SQLite files")
    return parser


def in_flight(executors: list[Executor]) -> float:
    total = 0.0
    for ex in executors:
        text = requests.get(ex.url + "/metrics", timeout=5).text
        total += sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("executor_in_flight")
        )
    return total


def one_job(api: Any, questions: int) -> dict[str, Any]:
    job = api.submit(
        {"questions": [f"q{i}: what is {i} + {i}?" for i in range(questions)],
         "models": list(MODELS), "failover": "any"}
    )  # fmt: skip
    wait_job_finished(api, job["id"], timeout=300)
    executions = api.results(job["id"])["executions"]
    tries = attempts(executions)
    # the job is done when its last execution succeeded (a hedge race's loser may still run)
    done = [a["finished_at"] for e in executions for a in e["attempt_log"] if a["ok"]]
    return {
        "makespan": max(done) - job["created_at"],
        "calls": len(tries),
        "executions": len(executions),
        "hedges": sum(e.get("hedges", 0) for e in executions),
        "ok": all(e["state"] == "succeeded" for e in executions),
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    print(f"machine: {machine()}")
    print(noisy())
    with ExitStack() as stack:
        tmp = stack.enter_context(workdir(args.keep))
        regions: dict[str, RegionConf] = {}
        executors = []
        for seed, (region, (latency, slots, served)) in enumerate(REGIONS.items()):
            models: dict[str, dict[str, Any]] = {
                m: {"provider": "simulated", "latency_s": latency} for m in MODELS[:served]
            }
            if STRAGGLER in models and not args.one_straggler:
                models[STRAGGLER].update(
                    tail_rate=args.tail_rate, tail_latency_s=args.tail_s, random_seed=seed
                )
            elif STRAGGLER in models and region == "asia-pacific":  # one straggler a job
                models[STRAGGLER].update(
                    tail_latency_s=args.tail_s, tail_request_id="[.]1$", tail_prompt="q7:"
                )
            # Spare threads: both dispatchers' seats are their own, and a hedge race's
            # loser runs on after its job finished (each job waits for idle executors).
            ex = Executor(tmp, region, models, workers=1, threads=slots * 2)
            stack.callback(ex.stop)
            ex.start()
            executors.append(ex)
            regions[region] = RegionConf(ex.url, slots, MODELS[:served])
            print(f"region {region:<13} {ex.description}, {list(models)}, {latency:g} s, "
                  f"{slots} slots")  # fmt: skip
        if args.one_straggler:
            print(f"one straggler a job: q7 x {STRAGGLER} in asia-pacific takes {args.tail_s:g} s")
        else:
            print(f"{STRAGGLER}: {args.tail_rate:.0%} of calls take {args.tail_s:g} s")
        regions_file = write_regions(tmp / "regions.toml", regions)
        dispatchers = {}
        for name, hedge in (("plain", "0"), ("hedged", "1")):
            url = stack.enter_context(store_url("sqlite", tmp))
            d = Dispatcher(tmp, url, regions_file, env={"ES_HEDGE": hedge}, name=name)
            stack.callback(d.stop)
            d.start()
            dispatchers[name] = d.api()
        results: dict[str, list[dict[str, Any]]] = {"plain": [], "hedged": []}
        for round_no in range(args.warmup + args.rounds):
            for name, api in dispatchers.items():
                wait_until(lambda: in_flight(executors) == 0, 60, 0.05, "idle executors")
                r = one_job(api, args.questions)
                counted = round_no >= args.warmup
                if counted:
                    results[name].append(r)
                print(
                    f"{'round' if counted else 'warm-up'} {round_no + 1} {name:<6}: makespan "
                    f"{r['makespan']:.3f} s, {r['calls']} calls for {r['executions']} "
                    f"executions, {r['hedges']} hedges, all succeeded: {r['ok']}"
                )
    plain = [r["makespan"] for r in results["plain"]]
    hedged = [r["makespan"] for r in results["hedged"]]
    calls = sum(r["calls"] for r in results["hedged"])
    executions = sum(r["executions"] for r in results["hedged"])
    hedges = sum(r["hedges"] for r in results["hedged"])
    mean = sum(hedged) / len(hedged) / (sum(plain) / len(plain))
    print(f"makespan with / without hedging, mean over the jobs: {mean:.3f}")
    print(
        f"makespan with / without hedging: median {median(hedged) / median(plain):.3f} "
        f"({median(hedged):.3f} s / {median(plain):.3f} s), worst job "
        f"{max(hedged) / max(plain):.3f} ({max(hedged):.3f} s / {max(plain):.3f} s), "
        f"over {len(plain)} jobs each"
    )
    print(
        f"extra calls with hedging: {hedges} hedges for {executions} executions = "
        f"{hedges / executions:.3f} of the calls; calls / executions {calls / executions:.3f} "
        f"(without hedging: "
        f"{sum(r['calls'] for r in results['plain']) / max(1, executions):.3f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
