"""Run the locust load test headless, bounded in time, and exit non-zero when a threshold fails.

Locally (the default) it starts the executor under gunicorn on a free loopback
port with the simulated catalog of this folder (and, for ``--target dispatcher``,
a dispatcher with a SQLite store whose two regions both point at that executor),
runs locust against it, checks the server afterwards (no model call left in
flight, no traceback or worker timeout in its log), and stops everything. With
``--host`` it targets a service that is already running (another machine, a
deployed region) and starts nothing.

    .venv/bin/python loadtests/run.py                          # 60 s, 10 users, sim-fast
    .venv/bin/python loadtests/run.py --duration 20s --users 8 --p95-ms 500
    .venv/bin/python loadtests/run.py --worker-class gevent --users 200 --model sim-1s
    .venv/bin/python loadtests/run.py --target dispatcher --users 4 --duration 30s
    LOADTEST_API_KEY=... .venv/bin/python loadtests/run.py \\
        --host https://executor.westeurope.example.net --model gpt-4o-mini --p95-ms 8000
    LOADTEST_API_KEY=... .venv/bin/python loadtests/run.py --target dispatcher \\
        --host https://dispatcher.example.net --model sim-fast --users 4

Reports (CSV and HTML, plus the servers' logs of a local run) go to the folder
``loadtests/reports/NAME/``; the HTML report opens with the verdict (PASSED or
FAILED and why), the thresholds and what was loaded. Exit code: 0 when every
threshold held, 1 when one failed (locust's own code, or this script's server
checks), 2 on bad usage, 3 when locust did not stop in time.
"""

from __future__ import annotations

import argparse
import csv
import html
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from localserver import (
    LOADTESTS,
    REPORTS,
    LocalDispatcher,
    LocalExecutor,
    parse_duration,
    wait_until,
)

LOCUSTFILE = LOADTESTS / "locustfile.py"
# Beyond --duration, how long locust may take to start, drain and write its reports.
LOCUST_GRACE_S = 60.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Run the locust load test headless against a local or deployed service.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    target = parser.add_argument_group("what to load")
    target.add_argument(
        "--host",
        default=os.environ.get("LOCUST_HOST", ""),
        help="base URL of a running service; empty starts a local executor on 127.0.0.1",
    )
    target.add_argument("--target", choices=["executor", "dispatcher"], default="executor")
    target.add_argument(
        "--api-key",
        default=None,
        help="bearer key for --host (default: $LOADTEST_API_KEY); a local run makes its own",
    )
    target.add_argument("--model", default=os.environ.get("LOADTEST_MODEL", "sim-fast"))
    load = parser.add_argument_group("load and thresholds")
    load.add_argument("--duration", default="60s", help="locust --run-time: 30, 30s, 2m")
    load.add_argument("--users", type=int, default=10, help="concurrent locust users")
    load.add_argument(
        "--spawn-rate", type=float, default=0, help="users started per second (0: all at once)"
    )
    load.add_argument("--think-min", type=float, default=0.0, help="seconds between a user's calls")
    load.add_argument("--think-max", type=float, default=1.0)
    load.add_argument("--bad-share", type=float, default=0.03, help="share of invalid requests")
    load.add_argument(
        "--p95-ms", type=float, default=1000.0, help="fail if any entry's p95 is above (0: off)"
    )
    load.add_argument(
        "--overload-ok", action="store_true", help="503 overloaded is expected, not a failure"
    )
    jobs = parser.add_argument_group("dispatcher jobs (--target dispatcher)")
    jobs.add_argument("--job-timeout", type=float, default=120.0, help="seconds a job may take")
    jobs.add_argument("--job-questions", type=int, default=3, help="questions per job")
    jobs.add_argument("--job-models", default="", help="comma-separated (default: --model)")
    jobs.add_argument("--job-regions", default="", help="comma-separated (default: all serving)")
    server = parser.add_argument_group("local server (ignored with --host)")
    server.add_argument("--worker-class", choices=["gthread", "gevent"], default="gthread")
    server.add_argument("--workers", type=int, default=4)
    server.add_argument("--threads", type=int, default=2)
    server.add_argument(
        "--max-in-flight", type=int, default=0, help="ES_MAX_IN_FLIGHT (0: default)"
    )
    server.add_argument(
        "--max-requests", type=int, default=None, help="GUNICORN_MAX_REQUESTS (default: gunicorn's)"
    )
    server.add_argument("--log-level", default="warning", help="ES_LOG_LEVEL of the server")
    report = parser.add_argument_group("reports")
    report.add_argument(
        "--report-dir", type=Path, default=REPORTS, help="each run writes a folder NAME here"
    )
    report.add_argument(
        "--name", default="", help="the run's folder and file prefix (default TARGET-TIMESTAMP)"
    )
    report.add_argument("--progress", action="store_true", help="print locust's table every 2 s")
    report.add_argument(
        "locust_args", nargs="*", help="more locust arguments, after --", metavar="LOCUST_ARG"
    )
    return parser


def locust_command(args: argparse.Namespace, host: str, prefix: Path, seconds: float) -> list[str]:
    """The headless locust command line; the API key goes in the environment, not here."""
    stop_timeout = args.job_timeout if args.target == "dispatcher" else 10.0
    command = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--host",
        host,
        "--users",
        str(args.users),
        "--spawn-rate",
        str(args.spawn_rate or args.users),
        "--run-time",
        f"{math.ceil(seconds)}s",
        "--stop-timeout",
        f"{math.ceil(stop_timeout)}s",
        "--csv",
        str(prefix),
        "--html",
        f"{prefix}.html",
        "--model",
        args.model,
        "--think-min",
        str(args.think_min),
        "--think-max",
        str(args.think_max),
        "--bad-share",
        str(args.bad_share),
        "--p95-ms",
        str(args.p95_ms),
        "--job-timeout",
        str(args.job_timeout),
        "--job-questions",
        str(args.job_questions),
        "--job-models",
        args.job_models,
        "--job-regions",
        args.job_regions,
    ]
    if args.overload_ok:
        command.append("--overload-ok")
    if not args.progress:
        command.append("--only-summary")
    return command + list(args.locust_args)


def read_stats(prefix: Path) -> list[dict[str, str]]:
    """The rows of locust's ``PREFIX_stats.csv`` (one per request name, then Aggregated)."""
    path = Path(f"{prefix}_stats.csv")
    if not path.exists():
        return []
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def print_summary(rows: list[dict[str, str]]) -> None:
    print(f"{'request':<40} {'count':>7} {'fail':>5} {'p50 ms':>7} {'p95 ms':>7} {'req/s':>7}")
    for row in rows:
        name = f"{row['Type']} {row['Name']}".strip()
        print(
            f"{name[:40]:<40} {row['Request Count']:>7} {row['Failure Count']:>5} "
            f"{row['50%']:>7} {row['95%']:>7} {float(row['Requests/s']):>7.1f}"
        )


def check_server(server: LocalExecutor) -> list[str]:
    """What the clients cannot see: calls left in flight (a leak), tracebacks, worker timeouts."""
    problems: list[str] = []
    try:
        # Calls the users started just before the stop may still be running.
        wait_until(lambda: server.metric("executor_in_flight") == 0, 30, 0.25, "in flight = 0")
    except TimeoutError as exc:
        # Either calls stayed counted (a leaked admission slot) or /metrics stopped answering.
        problems.append(f"model calls still in flight 30 s after the run, or no /metrics: {exc}")
    trouble = server.trouble()
    if trouble:
        problems.append(f"{len(trouble)} error lines in the server log, first: {trouble[0]}")
    return problems


def run(args: argparse.Namespace) -> int:
    seconds = parse_duration(args.duration)
    name = args.name or f"{args.target}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = args.report_dir / name
    run_dir.mkdir(parents=True, exist_ok=True)
    prefix = run_dir / name
    verdict_file = Path(f"{prefix}_thresholds.json")
    verdict_file.unlink(missing_ok=True)
    server: LocalExecutor | None = None
    dispatcher: LocalDispatcher | None = None
    # Never a default shown by --help: the key comes from the environment.
    api_key = args.api_key or os.environ.get("LOADTEST_API_KEY", "")
    env = dict(
        os.environ,
        LOADTEST_TARGET=args.target,
        LOADTEST_API_KEY=api_key,
        LOADTEST_VERDICT_FILE=str(verdict_file),
    )
    host = args.host
    code: int
    problems: list[str] = []
    try:
        if not args.host:
            server = LocalExecutor(
                worker_class=args.worker_class,
                workers=args.workers,
                threads=args.threads,
                max_in_flight=args.max_in_flight or None,
                log_level=args.log_level,
                max_requests=args.max_requests,
                log_path=Path(f"{prefix}-gunicorn.log"),
            )
            print(f"starting the executor on {server.url} ...", flush=True)
            server.start()
            print(f"executor: {server.description}", flush=True)
            host, env["LOADTEST_API_KEY"] = server.url, server.api_key
            if args.target == "dispatcher":
                # As many dispatcher slots as the executor admits: no 503 by design.
                per_worker = args.threads if args.worker_class == "gthread" else 8
                dispatcher = LocalDispatcher(
                    server,
                    slots=args.workers * per_worker,
                    log_path=Path(f"{prefix}-dispatcher.log"),
                )
                print(f"starting the dispatcher on {dispatcher.url}", flush=True)
                dispatcher.start()
                host, env["LOADTEST_API_KEY"] = dispatcher.url, dispatcher.api_key
        if server or args.target == "executor":  # an executor says what its model is
            executor_url = server.url if server else host
            executor_key = server.api_key if server else api_key
            args.model_description = model_description(executor_url, executor_key, args.model)
        command = locust_command(args, host, prefix, seconds)
        print(f"locust: {args.users} users for {seconds:g} s against {host}", flush=True)
        try:
            code = subprocess.run(command, env=env, timeout=seconds + LOCUST_GRACE_S).returncode
        except subprocess.TimeoutExpired:
            limit = seconds + LOCUST_GRACE_S
            print(f"run.py: locust did not stop within {limit:g} s", file=sys.stderr)
            code = 3
        problems = check_server(server) if server else []
        if dispatcher:
            problems += [f"dispatcher log: {line}" for line in dispatcher.trouble()[:3]]
    finally:
        if dispatcher:
            dispatcher.stop()
        if server:
            server.stop()
    rows = read_stats(prefix)
    if rows:
        print_summary(rows)
    for problem in problems:
        print(f"SERVER CHECK FAILED: {problem}", file=sys.stderr)
    if code == 0 and problems:
        code = 1
    reasons = locust_problems(verdict_file, code) + [f"server check: {p}" for p in problems]
    report_html = Path(f"{prefix}.html")
    if report_html.exists():
        add_verdict(
            report_html, verdict_html(code, reasons, run_facts(args, host, seconds, server))
        )
    files = [f"{report_html.name} (open it in a browser)", f"{prefix.name}_stats.csv"]
    files += [x.log_path.name for x in (server, dispatcher) if x]
    print(f"reports in {run_dir}/: {', '.join(files)}")
    print("PASSED" if code == 0 else f"FAILED (exit code {code})")
    return code


def locust_problems(verdict_file: Path, code: int) -> list[str]:
    """The thresholds locust found failed (locustfile.py writes them), or why there are none."""
    try:
        problems = list(json.loads(verdict_file.read_text())["problems"])
    except (OSError, ValueError, KeyError):
        problems = []
    if code == 3:
        problems.append(f"locust did not stop within --duration + {LOCUST_GRACE_S:g} s")
    elif code != 0 and not problems and not verdict_file.exists():
        problems.append(f"locust exited with code {code} before judging the thresholds")
    return problems


def model_description(url: str, key: str, model: str) -> str:
    """The catalog's description of ``model`` from the executor's GET /models ("" if none)."""
    import requests

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        listed = requests.get(url.rstrip("/") + "/models", headers=headers, timeout=10).json()
        return next(
            (str(m.get("description") or "") for m in listed["models"] if m["name"] == model), ""
        )
    except (requests.RequestException, ValueError, KeyError, TypeError):
        return ""  # the report says less, the run goes on


def run_facts(
    args: argparse.Namespace, host: str, seconds: float, server: LocalExecutor | None
) -> dict[str, list[tuple[str, str]]]:
    """What a reader of the report needs beside the figures: what was loaded, and the bar."""
    loaded = [
        ("target", f"{args.target} at {host}"),
        ("model", f"{args.model} ({args.model_description})"
                  if getattr(args, "model_description", "") else args.model),
        ("load", f"{args.users} users for {seconds:g} s, think time {args.think_min:g}.."
                 f"{args.think_max:g} s, {args.bad_share:.0%} invalid requests"),
    ]  # fmt: skip
    if server:
        loaded.append(("server", f"local: {server.description}"))
    if args.target == "dispatcher":
        models = args.job_models or args.model
        loaded.append(("jobs", f"{args.job_questions} questions x {models}, regions "
                               f"{args.job_regions or 'all serving'}"))  # fmt: skip
    p95 = f"<= {args.p95_ms:g} ms for every request entry" if args.p95_ms else "not checked"
    thresholds = [
        ("failures", "none unexpected: 200 for a valid call, 422 validation_error naming the "
                     "field for an invalid one" + (", 503 overloaded allowed" if args.overload_ok
                                                   else "")),
        ("p95 latency", p95),
        ("requests", "at least one; no exception in the user code"),
    ]  # fmt: skip
    if args.target == "dispatcher":
        thresholds.append(("jobs", f"each completes within {args.job_timeout:g} s, every "
                                   "execution succeeded with an output"))  # fmt: skip
    if server:
        thresholds.append(("server", "no model call in flight 30 s after the run; no traceback, "
                                     "WORKER TIMEOUT or critical line in the logs"))  # fmt: skip
    return {"what was loaded": loaded, "thresholds": thresholds}


def verdict_html(code: int, reasons: list[str], facts: dict[str, list[tuple[str, str]]]) -> str:
    """A banner for the top of locust's report: the verdict first, then why and against what."""
    passed = code == 0
    colour = "#1b5e20" if passed else "#b71c1c"
    title = "PASSED: every threshold held" if passed else f"FAILED (exit code {code})"
    parts = [
        '<section id="loadtest-verdict" style="font-family:sans-serif;background:#fff;color:#111;'
        f'border:4px solid {colour};margin:16px auto;max-width:1152px;padding:12px 20px">',
        f'<h1 style="color:{colour};margin:0 0 8px">{html.escape(title)}</h1>',
    ]
    if reasons:
        parts.append("<ul>" + "".join(f"<li>{html.escape(r)}</li>" for r in reasons) + "</ul>")
    for heading, rows in facts.items():
        parts.append(f'<h3 style="margin:8px 0 4px">{html.escape(heading)}</h3><table>')
        parts += [
            f'<tr><th style="text-align:left;padding-right:16px;vertical-align:top">'
            f"{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
            for k, v in rows
        ]
        parts.append("</table>")
    parts.append("</section>")
    return "\n".join(parts)


def add_verdict(report: Path, banner: str) -> None:
    """Put ``banner`` at the top of locust's HTML report (after ``<body>``)."""
    text = report.read_text()
    at = text.find("<body>")
    if at < 0:
        text = banner + text
    else:
        at += len("<body>")
        text = text[:at] + "\n" + banner + text[at:]
    report.write_text(text)


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
