"""R1: fetching a big job's results. The API worker's memory must stay flat with the job's
size, and /health must answer while big fetches stream (issue 10, item 7).

A job of ``--executions`` succeeded executions (80,000 by default: 10,000 questions x 4
models x 2 regions, each with an answer of ``--answer-chars`` characters, the
executor's body and one attempt) is written straight into a fresh store (SQLite, or
PostgreSQL with ``--store postgres``): no executor is involved. The dispatcher API is
then served by the documented command, ``executor-service dispatcher api``, with its
default worker class, and the whole results are fetched as JSON pages (following
``next_cursor``), as JSONL and as CSV: one fetch at a time, then four at once. During
each fetch a sampler reads the API worker's VmRSS every 10 ms (and its VmHWM, reset
before each phase through /proc/<pid>/clear_refs), and a prober asks ``GET /health``
every 20 ms. The baseline, in the same run: the worker's idle RSS after one small
request, and /health latency with nothing else going on.

``--code DIR`` (repeatable) serves the API from another checkout with the same store
and the same client, e.g. ``--code /work/main`` for the code before this change, so
the comparison is in one run on one machine. Figures on a shared machine: compare
the ratios, not the absolute times.

    .venv/bin/python bench/results_memory.py
    .venv/bin/python bench/results_memory.py --store postgres --code /work/main
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import requests
from common import (
    KEYS,
    REPO,
    Process,
    RegionConf,
    children,
    clean_env,
    free_port,
    machine,
    noisy,
    status_kb,
    store_url,
    workdir,
    write_regions,
)

from executor_service.dispatcher.store import open_store
from executor_service.dispatcher.store.base import NewJob

TENANT = "tenant-a"
HEADERS = {"Authorization": f"Bearer {KEYS[TENANT]}"}
REGIONS = ("region-1", "region-2")
HEALTH_EVERY_S = 0.02
SAMPLE_EVERY_S = 0.01


# -- the job ------------------------------------------------------------------------
def build_job(url: str, executions: int, models: int, answer_chars: int) -> str:
    """A job of ``executions`` succeeded executions, written into the store at ``url``."""
    per_question = models * len(REGIONS)
    questions = executions // per_question
    if questions * per_question != executions:
        sys.exit(f"--executions must be a multiple of {per_question} (models x regions)")
    names = [f"sim-{i}" for i in range(models)]
    store = open_store(url)  # migrates
    try:
        job, _ = store.create_job(
            NewJob(
                tenant=TENANT,
                questions=[
                    f"Question number {i}: what happened in year {1900 + i % 100}?"
                    for i in range(questions)
                ],
                models=names,
                regions_by_model={m: list(REGIONS) for m in names},
            ),
            time.time(),
        )
    finally:
        store.close()
    filler = ("The answer, at some length, as a small model gives it. " * 40)[:answer_chars]
    if url.startswith("sqlite"):
        import sqlite3

        conn = sqlite3.connect(url.removeprefix("sqlite:///"))
        result = (
            "json_object('output', output, 'model', model, 'region', requested_region, "
            "'replica', requested_region || '-1', 'finish_reason', 'stop', "
            "'usage', json_object('prompt_tokens', 20, 'completion_tokens', 100), "
            "'timing', json_object('queue_ms', 0.1, 'model_ms', 800.0, 'total_ms', 801.0))"
        )
        ok, param = "1", "?"
    else:
        import psycopg

        conn = psycopg.connect(url)  # type: ignore[assignment]
        result = (
            "jsonb_build_object('output', output, 'model', model, 'region', requested_region, "
            "'replica', requested_region || '-1', 'finish_reason', 'stop', "
            "'usage', jsonb_build_object('prompt_tokens', 20, 'completion_tokens', 100), "
            "'timing', jsonb_build_object('queue_ms', 0.1, 'model_ms', 800.0, 'total_ms', 801.0))"
        )
        ok, param = "true", "%s"
    with conn:
        conn.execute(
            "UPDATE executions SET state = 'succeeded', executed_region = requested_region, "
            f"attempts = 1, finished_at = created_at + 1, output = question || ' ' || {param} "
            f"WHERE job_id = {param}",
            (filler, job.id),
        )
        conn.execute(f"UPDATE executions SET result = {result} WHERE job_id = {param}", (job.id,))
        conn.execute(
            "INSERT INTO attempts (execution_id, number, region, started_at, finished_at, ok) "
            f"SELECT id, 1, requested_region, created_at, created_at + 1, {ok} "
            f"FROM executions WHERE job_id = {param}",
            (job.id,),
        )
    conn.close()
    return job.id


# -- the API ------------------------------------------------------------------------
class API(Process):
    """``executor-service dispatcher api`` (the process becomes the gunicorn master)."""

    def __init__(self, tmp: Path, url: str, regions_file: Path, code: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        metrics = tmp / f"metrics-{self.port}"
        metrics.mkdir()
        env = {
            **clean_env(),
            "ES_DATABASE_URL": url,
            "ES_REGIONS_FILE": str(regions_file),
            "ES_API_KEYS": ",".join(f"{t}:{k}" for t, k in KEYS.items()),
            "ES_LOG_LEVEL": "warning",
            "PROMETHEUS_MULTIPROC_DIR": str(metrics),
            "PYTHONPATH": str(code),
        }
        argv = [sys.executable, "-m", "executor_service.cli", "dispatcher", "api"]
        argv += ["--host", "127.0.0.1", "--port", str(self.port)]
        super().__init__(f"api ({code})", argv, env, tmp / f"api-{self.port}.log")
        self.cwd = code

    def start(self) -> API:
        self.spawn()
        self.wait_http(self.url + "/health")
        return self

    def worker(self) -> int:
        (pid,) = children(self.pid)
        return pid


# -- measuring ------------------------------------------------------------------------
class Watch:
    """While running: the worker's RSS every 10 ms, /health's latency every 20 ms."""

    def __init__(self, api: API, pid: int) -> None:
        self.api, self.pid = api, pid
        self.rss_kb: list[int] = []
        self.health_s: list[float] = []
        self.health_failed = 0
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._sample, daemon=True),
            threading.Thread(target=self._probe, daemon=True),
        ]

    def __enter__(self) -> Watch:
        with contextlib.suppress(OSError):  # reset the peak (VmHWM) to the current RSS
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()
        self.hwm_kb = status_kb(self.pid)["VmHWM"]

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY_S):
            self.rss_kb.append(status_kb(self.pid)["VmRSS"])

    def _probe(self) -> None:
        with requests.Session() as session:
            while not self._stop.wait(HEALTH_EVERY_S):
                started = time.monotonic()
                try:
                    ok = session.get(self.api.url + "/health", timeout=60).status_code == 200
                except requests.RequestException:
                    ok = False
                self.health_s.append(time.monotonic() - started)
                self.health_failed += not ok

    @property
    def peak_mb(self) -> float:
        return max([self.hwm_kb, *self.rss_kb]) / 1024


def fetch_json(api: API, job_id: str) -> tuple[int, int]:
    """Every page, following next_cursor: (executions, bytes)."""
    count = size = 0
    params: dict[str, str] = {}
    with requests.Session() as session:
        while True:
            r = session.get(
                f"{api.url}/jobs/{job_id}/results", params=params, headers=HEADERS, timeout=300
            )
            r.raise_for_status()
            page = r.json()
            count, size = count + len(page["executions"]), size + len(r.content)
            if not page["next_cursor"]:
                return count, size
            params = {"cursor": page["next_cursor"]}


def fetch_stream(fmt: str) -> Callable[[API, str], tuple[int, int]]:
    def fetch(api: API, job_id: str) -> tuple[int, int]:
        lines = size = 0
        with requests.get(
            f"{api.url}/jobs/{job_id}/results",
            params={"format": fmt},
            headers=HEADERS,
            stream=True,
            timeout=300,
        ) as r:
            r.raise_for_status()
            for chunk in r.iter_content(64 * 1024):
                size += len(chunk)
                lines += chunk.count(b"\n")
        return (lines - 1 if fmt == "csv" else lines), size  # CSV: the header (no newlines
        # in cells here: the answers are one line)

    return fetch


FETCHES = {"json pages": fetch_json, "jsonl": fetch_stream("jsonl"), "csv": fetch_stream("csv")}


def phase(api: API, pid: int, job_id: str, fetch: Callable[..., Any], n: int) -> dict[str, Any]:
    results: list[tuple[int, int]] = []
    errors: list[BaseException] = []

    def one() -> None:
        try:
            results.append(fetch(api, job_id))
        except BaseException as exc:  # reported, not raised from a thread
            errors.append(exc)

    with Watch(api, pid) as watch:
        started = time.monotonic()
        threads = [threading.Thread(target=one) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - started
    if errors:
        raise RuntimeError(f"fetch failed: {errors[0]!r}")
    return {
        "seconds": elapsed,
        "rows": [r[0] for r in results],
        "mb": sum(r[1] for r in results) / 1e6,
        "peak_mb": watch.peak_mb,
        "health_max_ms": max(watch.health_s, default=0) * 1000,
        "health_p50_ms": statistics.median(watch.health_s or [0]) * 1000,
        "health_n": len(watch.health_s),
        "health_failed": watch.health_failed,
    }


def idle(api: API, pid: int, job_id: str) -> dict[str, Any]:
    requests.get(f"{api.url}/jobs/{job_id}", headers=HEADERS, timeout=30).raise_for_status()
    with Watch(api, pid) as watch:
        time.sleep(2.0)  # /health alone, 2 s of probes
    return {
        "rss_mb": status_kb(pid)["VmRSS"] / 1024,
        "health_max_ms": max(watch.health_s) * 1000,
        "health_p50_ms": statistics.median(watch.health_s) * 1000,
        "health_n": len(watch.health_s),
    }


def run_code(tmp: Path, url: str, regions: Path, code: Path, job_id: str, total: int) -> None:
    with ExitStack() as stack:
        api = API(tmp, url, regions, code)
        stack.callback(api.stop)
        api.start()
        pid = api.worker()
        base = idle(api, pid, job_id)
        print(f"\n== API from {code} (worker pid {pid}) ==")
        print(
            f"baseline: idle RSS {base['rss_mb']:.1f} MB; /health alone p50 "
            f"{base['health_p50_ms']:.1f} ms, max {base['health_max_ms']:.1f} ms "
            f"({base['health_n']} probes)"
        )
        header = (
            f"{'fetch':<12} {'at once':>7} {'s':>7} {'MB out':>8} {'peak RSS':>9} "
            f"{'x idle':>7} {'/health p50':>12} {'/health max':>12} {'probes':>7}"
        )
        print(header)
        for name, fetch in FETCHES.items():
            for n in (1, 4):
                r = phase(api, pid, job_id, fetch, n)
                if any(rows != total for rows in r["rows"]):
                    print(f"  !! {name}: rows {r['rows']}, expected {total} each")
                failed = f" ({r['health_failed']} failed)" if r["health_failed"] else ""
                print(
                    f"{name:<12} {n:>7} {r['seconds']:>7.2f} {r['mb']:>8.1f} "
                    f"{r['peak_mb']:>6.1f} MB {r['peak_mb'] / base['rss_mb']:>6.2f}x "
                    f"{r['health_p50_ms']:>9.1f} ms {r['health_max_ms']:>9.1f} ms "
                    f"{r['health_n']:>7}{failed}"
                )
                sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--executions", type=int, default=80_000)
    parser.add_argument("--models", type=int, default=4)
    parser.add_argument("--answer-chars", type=int, default=400)
    parser.add_argument("--store", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--code", type=Path, action="append", help="checkouts to serve from")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    codes = args.code or [REPO]
    print(machine())
    with workdir(args.keep) as tmp, store_url(args.store, tmp) as url:
        models = tuple(f"sim-{i}" for i in range(args.models))
        regions = write_regions(
            tmp / "regions.toml", {r: RegionConf("http://127.0.0.1:9", 4, models) for r in REGIONS}
        )
        started = time.monotonic()
        job_id = build_job(url, args.executions, args.models, args.answer_chars)
        print(
            f"{args.store} store: job {job_id}, {args.executions} succeeded executions "
            f"(answers {args.answer_chars} chars), written in {time.monotonic() - started:.1f} s"
        )
        for code in codes:
            run_code(tmp, url, regions, code.resolve(), job_id, args.executions)
    print(noisy())


if __name__ == "__main__":
    main()
