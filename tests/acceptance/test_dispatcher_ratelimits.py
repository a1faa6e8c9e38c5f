"""Rate limits and backpressure end to end (issue 9): real gunicorn executors serving a
rate-limited simulated provider, the real dispatcher command, counts taken at "the
provider" (the simulated model's arrival log: one line per call it received, admitted
or refused).

The provider's limit is a token bucket of R requests (or T tokens) per window; the
regions file gives the dispatcher the same budget. Windows are a few seconds instead of
a minute to keep the tests short: the rules are the same, only the unit changes.
Assertions are counts (calls refused, calls in any sliding window, attempts, states),
never timings.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from dispatcher_harness import DispatcherProcess, executor, postgres_database, wait_finished
from support import Gunicorn, wait_until

pytestmark = pytest.mark.slow
logger = logging.getLogger(__name__)

WINDOW_S = 3.0
RPM = 30  # per WINDOW_S: 10 calls/s
CONCURRENCY = 16  # far above what RPM allows at these latencies


def limited_model(tmp: Path, name: str, **limits: Any) -> dict[str, Any]:
    return {
        "provider": "simulated",
        "latency_s": 0.02,
        "rate_window_s": WINDOW_S,
        "rate_state_file": str(tmp / f"{name}.bucket"),
        "rate_log": str(tmp / f"{name}.arrivals"),
        **limits,
    }


def regions_file(path: Path, url: str, models: Mapping[str, Mapping[str, Any]]) -> Path:
    """One region ``r1`` serving ``models`` (name -> its limits table, maybe empty)."""
    quoted = ", ".join(f'"{m}"' for m in models)
    lines = [
        "[regions.r1]",
        f'url = "{url}"',
        f"concurrency = {CONCURRENCY}",
        f"models = [{quoted}]",
        "timeout_s = 30",
        "",
    ]
    for model, limits in models.items():
        if limits:
            lines.append(f'[regions.r1.limits."{model}"]')
            lines += [f"{k} = {v}" for k, v in limits.items()]
            lines.append("")
    path.write_text("\n".join(lines))
    return path


def arrivals(tmp: Path, name: str) -> list[tuple[float, bool, int]]:
    """(unix time, admitted, tokens charged) of every call the provider received."""
    out = []
    for line in (tmp / f"{name}.arrivals").read_text().splitlines():
        at, admitted, cost = line.split()
        out.append((float(at), admitted == "1", int(cost)))
    return sorted(out)


def max_in_window(times: list[float], window: float) -> int:
    """The most calls in any sliding window of ``window`` seconds."""
    return max((bisect.bisect_left(times, t + window) - i for i, t in enumerate(times)), default=0)


def limited_executor(tmp: Path, models: Mapping[str, Mapping[str, Any]]) -> Gunicorn:
    return executor(tmp, "r1", models, threads=CONCURRENCY)


def run_job(api: Any, body: dict[str, Any], timeout: float = 90) -> list[dict[str, Any]]:
    job = api.submit(body)
    wait_finished(api, job["id"], timeout=timeout)
    return api.results(job["id"])["executions"]  # type: ignore[no-any-return]


def assert_no_attempt_spent_on_backpressure(executions: list[dict[str, Any]]) -> None:
    for e in executions:
        assert e["state"] == "succeeded", e
        assert e["attempts"] == 1, e  # a 429 is never an attempt
        refused = [a for a in e["attempt_log"] if not a["ok"]]
        assert len(refused) == e["deferrals"]  # every call sent is in the log
        assert all(a["error"]["deferred"] for a in refused)


def test_a_job_through_an_rpm_limited_provider_all_succeeds(tmp_path: Path) -> None:
    n = 3 * RPM  # three windows' worth, sent with 16 slots
    models = {"sim-rpm": limited_model(tmp_path, "sim-rpm", rpm=RPM)}
    with limited_executor(tmp_path, models) as ex:
        regions = regions_file(
            tmp_path / "regions.toml", ex.url, {"sim-rpm": {"rpm": RPM, "window_s": WINDOW_S}}
        )
        with DispatcherProcess(tmp_path, f"sqlite:///{tmp_path / 'd.db'}", regions) as d:
            executions = run_job(
                d.api(), {"questions": [f"q{i}" for i in range(n)], "models": ["sim-rpm"]}
            )
    calls = arrivals(tmp_path, "sim-rpm")
    refused = sum(1 for _, ok, _ in calls if not ok)
    logger.warning("rpm: %d calls sent for %d executions, %d refused", len(calls), n, refused)
    assert len(executions) == n
    assert_no_attempt_spent_on_backpressure(executions)
    assert refused <= 0.03 * len(calls)
    assert len(calls) == n + refused
    assert max_in_window([t for t, _, _ in calls], WINDOW_S) <= RPM


@pytest.mark.postgres
def test_two_dispatchers_on_one_postgres_share_one_rpm_budget(tmp_path: Path) -> None:
    n = 3 * RPM
    models = {"sim-rpm": limited_model(tmp_path, "sim-rpm", rpm=RPM)}
    with postgres_database() as url, limited_executor(tmp_path, models) as ex:
        regions = regions_file(
            tmp_path / "regions.toml", ex.url, {"sim-rpm": {"rpm": RPM, "window_s": WINDOW_S}}
        )
        with (
            DispatcherProcess(tmp_path, url, regions) as d1,
            DispatcherProcess(tmp_path, url, regions, api=False) as d2,
        ):
            executions = run_job(
                d1.api(), {"questions": [f"q{i}" for i in range(n)], "models": ["sim-rpm"]}
            )
            shares = (d1.calls_made(), d2.calls_made())
    calls = arrivals(tmp_path, "sim-rpm")
    refused = sum(1 for _, ok, _ in calls if not ok)
    busiest = max_in_window([t for t, _, _ in calls], WINDOW_S)
    logger.warning(
        "two processes: calls %s, %d refused, busiest window %d", shares, refused, busiest
    )
    assert min(shares) > 0  # both processes sent calls
    assert_no_attempt_spent_on_backpressure(executions)
    # Counted at the provider: no sliding window holds more than the one shared budget
    # (each process alone would have stayed under it, and both together would not).
    assert busiest <= RPM
    assert refused <= 0.03 * len(calls)


def test_calls_with_large_max_tokens_are_paced_by_tokens(tmp_path: Path) -> None:
    # ~200 tokens reserved per call (prompt/4 + max_tokens), ~160 used (a long answer);
    # 1600 tokens per window: about ten calls per window, while no rpm limit exists.
    tpm, max_tokens, n = 1600, 200, 25
    answer = " ".join(["word"] * 150)
    models = {"sim-tpm": {**limited_model(tmp_path, "sim-tpm", tpm=tpm), "output": answer}}
    with limited_executor(tmp_path, models) as ex:
        regions = regions_file(
            tmp_path / "regions.toml", ex.url, {"sim-tpm": {"tpm": tpm, "window_s": WINDOW_S}}
        )
        with DispatcherProcess(tmp_path, f"sqlite:///{tmp_path / 'd.db'}", regions) as d:
            executions = run_job(
                d.api(),
                {
                    "questions": [f"question {i}" for i in range(n)],
                    "models": ["sim-tpm"],
                    "params": {"max_tokens": max_tokens},
                },
            )
    calls = arrivals(tmp_path, "sim-tpm")
    refused = sum(1 for _, ok, _ in calls if not ok)
    busiest = max_in_window([t for t, _, _ in calls], WINDOW_S)
    used = min(e["usage"]["prompt_tokens"] + e["usage"]["completion_tokens"] for e in executions)
    logger.warning(
        "tpm: %d calls, %d refused, busiest window %d calls", len(calls), refused, busiest
    )
    assert_no_attempt_spent_on_backpressure(executions)
    assert refused <= 0.05 * len(calls)
    # Paced by tokens: the busiest window holds about tpm / tokens per call (plus the
    # one call a bucket lets into debt), nowhere near the 16 slots or the whole job.
    assert busiest <= tpm // used + 2


def test_an_always_429_model_does_not_stall_a_healthy_one(tmp_path: Path) -> None:
    questions = [f"q{i}" for i in range(20)]
    models = {
        "sim-ok": {"provider": "simulated", "latency_s": 0.05},
        "sim-429": {
            "provider": "simulated",
            "error_rate": 1.0,
            "error_kind": "429",
            "retry_after_s": 1,
        },
    }
    deadline_s = 8
    with limited_executor(tmp_path, models) as ex:
        regions = regions_file(tmp_path / "regions.toml", ex.url, {"sim-ok": {}, "sim-429": {}})
        db = f"sqlite:///{tmp_path / 'd.db'}"
        # One strike would open a circuit: backpressure must never strike.
        env = {"ES_CIRCUIT_THRESHOLD": "1", "ES_CIRCUIT_COOLDOWN_S": "600"}
        with DispatcherProcess(tmp_path, db, regions, env) as d:
            api = d.api()
            job = api.submit(
                {
                    "questions": questions,
                    "models": ["sim-ok", "sim-429"],
                    "failover": "none",
                    "deadline_s": deadline_s,
                }
            )
            # While it runs, the job says why the 429 model's work waits, and only its.
            waiting = wait_until(
                lambda: api.job(job["id"])["waiting"].get("r1"), timeout=30, what="waiting"
            )
            view = wait_finished(api, job["id"], timeout=60)
            executions = api.results(job["id"])["executions"]
            queue = api.queue()
    ok = [e for e in executions if e["model"] == "sim-ok"]
    limited = [e for e in executions if e["model"] == "sim-429"]
    assert len(ok) == len(limited) == len(questions)
    assert set(waiting) == {"sim-429"}
    assert (
        "rate limited" in waiting["sim-429"]["reason"]
        or "concurrency" in waiting["sim-429"]["reason"]
    )
    # The healthy model: every answer, first try, no wait, long before the deadline.
    for e in ok:
        assert e["state"] == "succeeded" and e["attempts"] == 1 and e["deferrals"] == 0
        assert e["finished_at"] < view["deadline_at"]
    # The always-429 model: ends at the job's deadline with a clear error, no attempt spent.
    for e in limited:
        assert e["state"] == "dead", e
        assert e["last_error"]["code"] == "deadline_exceeded"
        assert "deadline" in e["last_error"]["message"]
        # what it was waiting for, if it was ever sent (AIMD sends few while refused)
        last = e["last_error"]["last"]
        assert last is None or last["code"] == "rate_limited"
        assert e["attempts"] == 0
        assert e["finished_at"] >= view["deadline_at"] - 1.0
    tried = [e for e in limited if e["deferrals"]]
    assert tried and all(e["last_error"]["last"]["code"] == "rate_limited" for e in tried)
    # Backpressure never struck a circuit, with a threshold of one failure.
    region = next(r for r in queue["regions"] if r["region"] == "r1")
    assert region["circuit"] == "closed"
    paces = {m["model"]: m for m in region["models"]}
    assert paces["sim-429"]["circuit"] == "closed"
    assert paces["sim-429"]["deferrals"] == sum(e["deferrals"] for e in limited)
    assert paces["sim-429"]["concurrency"] < paces["sim-429"]["max_concurrency"]  # AIMD cut
    assert paces["sim-ok"]["deferrals"] == 0
