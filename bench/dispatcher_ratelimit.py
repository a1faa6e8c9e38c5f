"""D5: a job through a rate-limited provider, two dispatcher processes on one store.

Target (DESIGN.md): 0 dead, makespan <= 1.10x N/R, calls refused (429) <= 2% of calls.

The provider is the simulated model's rate-limit mode: a token bucket of R requests per
window (``--window``; 60 s is a real rpm, the default 10 s keeps the run to a couple of
minutes: the same rules at a shorter unit), kept in a file so both gunicorn workers of
the executor share it, 429 with Retry-After and x-ratelimit-* beyond it. Its request
bucket holds one second's worth (``--burst``), as providers that enforce "300 rpm" as 5
per second do; ``--burst 0`` lets a whole window's R through at once. It logs every
call it receives (admitted or refused), so the counts are taken at the provider. Each
mode gets its own model (its own bucket and log), its own fresh store, and two
``executor-service dispatcher`` processes (one with the API, one ``--no-api``):

    paced      the regions file gives the (region, model) the provider's budget (rpm R
               per window): the fleet-wide bucket in the store paces the claims;
    reactive   no budget: only the 429s pace (shared not_before, AIMD concurrency);
    baseline   what the dispatcher did before issue 9, run from the git history
               (``--baseline-ref``, exported with ``git archive``): it paces nothing,
               a 429 is a failed attempt and a strike against the region's circuit.

    .venv/bin/python bench/dispatcher_ratelimit.py
    .venv/bin/python bench/dispatcher_ratelimit.py --rpm 60 --window 60 --calls 120
"""

from __future__ import annotations

import argparse
import bisect
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from common import (
    REPO,
    Dispatcher,
    Executor,
    machine,
    noisy,
    store_url,
    wait_job_finished,
    workdir,
)

# main just before issue 9 landed: the dispatcher without pacing ("what it did before").
DEFAULT_BASELINE_REF = "94b3dd0"
MODES = ("paced", "reactive", "baseline")
SITECUSTOMIZE = """\
import sys
# The baseline runs the old package from PYTHONPATH: drop the editable install's finder,
# which would otherwise resolve executor_service to this checkout first.
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="D5: a job through a rate-limited provider, two dispatcher processes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--rpm", type=int, default=60, help="R: requests per window")
    parser.add_argument("--window", type=float, default=10.0, help="the limit's window, s")
    parser.add_argument("--calls", type=int, default=150, help="N: executions in the job")
    parser.add_argument(
        "--burst",
        type=float,
        default=1.0,
        help="the provider's request bucket holds this many seconds' worth (0: a whole "
        "window, a burst of R at once)",
    )
    parser.add_argument("--concurrency", type=int, default=16, help="the region's slots")
    parser.add_argument("--latency", type=float, default=0.05, help="the model's latency, s")
    parser.add_argument("--store", choices=["sqlite", "postgres"], default="postgres")
    parser.add_argument("--modes", default=",".join(MODES), help="of " + ", ".join(MODES))
    parser.add_argument("--baseline-ref", default=DEFAULT_BASELINE_REF, help="git ref")
    parser.add_argument("--keep", action="store_true", help="keep the logs")
    return parser


def baseline_env(tmp: Path, ref: str) -> dict[str, str]:
    """PYTHONPATH that runs the package as it was at ``ref`` (API children included)."""
    tree = tmp / "baseline-tree"
    site = tmp / "baseline-site"
    tree.mkdir()
    site.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", ref, "executor_service"],
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return {"PYTHONPATH": f"{site}:{tree}"}


def regions_toml(url: str, model: str, args: argparse.Namespace, budget: bool) -> str:
    lines = [
        "[regions.r1]",
        f'url = "{url}"',
        f"concurrency = {args.concurrency}",
        f'models = ["{model}"]',
        "timeout_s = 30.0",
        "",
    ]
    if budget:
        lines += [
            f'[regions.r1.limits."{model}"]',
            f"rpm = {args.rpm}",
            f"window_s = {args.window}",
        ]
    return "\n".join(lines) + "\n"


def arrivals(path: Path) -> list[tuple[float, bool]]:
    out = []
    for line in path.read_text().splitlines():
        at, admitted, _ = line.split()
        out.append((float(at), admitted == "1"))
    return sorted(out)


def max_in_window(times: list[float], window: float) -> int:
    return max((bisect.bisect_left(times, t + window) - i for i, t in enumerate(times)), default=0)


def run_mode(mode: str, args: argparse.Namespace, tmp: Path, ex: Executor) -> dict[str, Any]:
    model = f"sim-{mode}"
    env = {"ES_LOG_LEVEL": "warning"}
    if mode == "baseline":
        env.update(baseline_env(tmp, args.baseline_ref))
    regions = tmp / f"regions-{mode}.toml"
    regions.write_text(regions_toml(ex.url, model, args, budget=mode == "paced"))
    with ExitStack() as stack:
        url = stack.enter_context(store_url(args.store, tmp))
        front = Dispatcher(tmp, url, regions, env=env, name=f"dispatcher-{mode}-1")
        back = Dispatcher(tmp, url, regions, env=env, api=False, name=f"dispatcher-{mode}-2")
        if mode == "baseline":  # not this checkout's directory: python -m would import it
            front.cwd = back.cwd = tmp
        stack.callback(front.stop)
        front.start()
        stack.callback(back.stop)
        back.start()
        api = front.api()
        started = time.time()
        job = api.submit({"questions": [f"d5 {mode} {i}" for i in range(args.calls)],
                          "models": [model]})  # fmt: skip
        ideal = args.calls * args.window / args.rpm
        view = wait_job_finished(api, job["id"], timeout=ideal * 4 + 120)
        executions = api.results(job["id"])["executions"]
    finished = max((e["finished_at"] or started) for e in executions)
    calls = arrivals(tmp / f"{model}.arrivals")
    refused = sum(1 for _, ok in calls if not ok)
    states = view["states"]
    return {
        "mode": mode,
        "succeeded": states.get("succeeded", 0),
        "dead": states.get("dead", 0),
        "makespan_s": finished - started,
        "ideal_s": ideal,
        "calls": len(calls),
        "refused": refused,
        "busiest": max_in_window([t for t, _ in calls], args.window),
        "attempts": sum(e["attempts"] for e in executions),
        "deferrals": sum(e.get("deferrals", 0) for e in executions),
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - set(MODES):
        sys.exit(f"--modes: some of {', '.join(MODES)}")
    print(f"machine: {machine()}")
    print(noisy())
    results = []
    with ExitStack() as stack:
        tmp = stack.enter_context(workdir(args.keep))
        models = {
            f"sim-{mode}": {
                "provider": "simulated",
                "latency_s": args.latency,
                "rpm": args.rpm,
                "rate_window_s": args.window,
                "rate_state_file": str(tmp / f"sim-{mode}.bucket"),
                "rate_log": str(tmp / f"sim-{mode}.arrivals"),
                **({"rate_burst_s": args.burst} if args.burst > 0 else {}),
            }
            for mode in modes
        }
        threads = max(args.concurrency, 4)
        ex = Executor(tmp, "r1", models, workers=2, threads=threads)
        stack.callback(ex.stop)
        ex.start()
        print(
            f"provider: {args.rpm} requests per {args.window:g} s "
            f"(= {args.rpm * 60 / args.window:g} rpm), token bucket shared by 2 executor "
            f"workers holding {f'{args.burst:g} s' if args.burst > 0 else 'a window'} of it, "
            f"{args.latency:g} s latency; "
            f"job of N={args.calls} calls, region concurrency {args.concurrency}, 2 dispatcher "
            f"processes on {args.store}; N/R = {args.calls * args.window / args.rpm:.1f} s"
        )
        for mode in modes:
            r = run_mode(mode, args, tmp, ex)
            results.append(r)
            print(
                f"  {mode:9s} dead {r['dead']:4d}/{args.calls}  makespan {r['makespan_s']:6.1f} s "
                f"= {r['makespan_s'] / r['ideal_s']:.2f}x N/R  calls sent {r['calls']:5d}  "
                f"refused {r['refused']:5d} ({r['refused'] / max(1, r['calls']):.1%})  busiest "
                f"window {r['busiest']} (limit {args.rpm}); attempts counted "
                f"{r['attempts']}, deferrals {r['deferrals']}",
                flush=True,
            )
    for r in results:
        share = r["refused"] / max(1, r["calls"])
        ratio = r["makespan_s"] / r["ideal_s"]
        ok = r["dead"] == 0 and ratio <= 1.10 and share <= 0.02
        print(
            f"D5 {r['mode']}: dead {r['dead']}, makespan / (N/R) {ratio:.3f}, refused "
            f"{share:.1%} of {r['calls']} calls: {'meets' if ok else 'MISSES'} the target"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
