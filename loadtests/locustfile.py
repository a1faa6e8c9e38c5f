"""Locust load tests for the executor and the dispatcher.

Two user classes, picked with ``LOADTEST_TARGET`` (executor | dispatcher | all,
default executor) or, when both are enabled, by naming one on the command line
(``locust -f loadtests/locustfile.py DispatcherUser``) or with ``--class-picker``
in the web UI:

- ``ExecutorUser``: ``POST /execute`` on one (simulated or real) model with a
  realistic mix of prompt sizes, ``prompt`` and ``messages`` bodies, sampling
  parameters, and a small share of invalid requests that must be answered 422
  ``validation_error`` (counted as successes under their own name, so they
  neither fail the run nor skew the latency of real calls) without leaking
  anything: no stack trace, no API key, no echo of a huge prompt.
- ``DispatcherUser``: ``POST /jobs`` with a small job, follows ``GET /jobs/<id>``
  until the job is finished, then checks ``GET /jobs/<id>/results``: every
  execution succeeded and has an output. The time from submit to the checked
  results is reported as a ``JOB`` entry named ``job completed``.

Everything that differs between a laptop and a deployed region comes from
options, each with an environment variable: ``--host`` (``LOCUST_HOST``),
``--api-key`` (``LOADTEST_API_KEY``), ``--model``, ``--think-min/--think-max``,
``--bad-share``, ``--p95-ms`` ... (see ``locust -f loadtests/locustfile.py --help``).

Thresholds, checked when locust quits (``environment.process_exit_code = 1``):
any failure or exception, no request at all, a p95 over ``--p95-ms`` in any
request entry, and (dispatcher) a job that did not complete within ``--job-timeout``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
import uuid
from typing import Any

import gevent
from locust import FastHttpUser, events, task
from locust.env import Environment
from locust.runners import WorkerRunner
from locust.stats import CSV_STATS_INTERVAL_SEC

logger = logging.getLogger("loadtest")

TARGET = os.environ.get("LOADTEST_TARGET", "executor").strip().lower()
if TARGET not in {"executor", "dispatcher", "all"}:
    raise SystemExit(f"LOADTEST_TARGET={TARGET!r}: expected executor, dispatcher or all")

EXECUTE = "/execute"
BAD_NAME = "/execute [invalid -> 422]"
OVERLOADED_NAME = "/execute [503 overloaded]"
JOB_NAME = "job completed"
# A 422 body is a short list of field messages; anything much bigger echoes input back.
MAX_ERROR_BYTES = 4096

# Prompt sizes in characters and their shares: mostly short questions, some pasted
# documents, a few near the 32,000-character limit.
PROMPT_MIX: list[tuple[float, int, int]] = [
    (0.55, 20, 200),
    (0.25, 200, 2_000),
    (0.15, 2_000, 8_000),
    (0.05, 8_000, 30_000),
]
MESSAGES_SHARE = 0.25  # of valid calls, sent as a chat transcript instead of a prompt
# fmt: off
_WORDS = [
    "the", "model", "region", "answer", "question", "latency", "token", "prompt", "bias",
    "probe", "compare", "evaluate", "census", "river", "mountain", "policy", "history",
    "election", "science", "language", "culture", "economy", "summarise", "translate",
    "explain", "list", "describe", "why", "how", "when", "where", "which", "who",
]
# fmt: on
_rng = random.Random(1234)
CORPUS = " ".join(_rng.choice(_WORDS) for _ in range(8_000))  # ~50,000 characters

# Invalid bodies: (what is wrong, body, the field the 422 details must name).
BAD_REQUESTS: list[tuple[str, dict[str, Any], str]] = [
    ("no model", {"prompt": "hello"}, "model"),
    ("prompt and messages", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, ""),
    ("neither prompt nor messages", {"max_tokens": 8}, ""),
    ("empty prompt", {"prompt": ""}, "prompt"),
    ("prompt over 32,000 characters", {"prompt": "x" * 32_001}, "prompt"),
    ("max_tokens 0", {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ("max_tokens too big", {"prompt": "hi", "max_tokens": 100_000}, "max_tokens"),
    ("temperature 7", {"prompt": "hi", "temperature": 7}, "temperature"),
    ("bad role", {"messages": [{"role": "robot", "content": "hi"}]}, "messages"),
    ("request_id with spaces", {"prompt": "hi", "request_id": "not valid !"}, "request_id"),
    ("max_tokens as text", {"prompt": "hi", "max_tokens": "many"}, "max_tokens"),
]
FINAL_JOB_STATES = {"succeeded", "completed", "complete", "done", "finished", "failed", "dead"}
FINAL_JOB_STATES |= {"cancelled", "partial"}
FINAL_EXECUTION_STATES = {"succeeded", "dead", "cancelled"}

# Jobs of this process, for the summary at quit; submitted - completed - failed were
# still running when the run stopped (interrupted, not failed).
_jobs = {"submitted": 0, "completed": 0, "failed": 0}


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    """The options of this file; each also reads an environment variable."""
    parser.add_argument(
        "--api-key",
        env_var="LOADTEST_API_KEY",
        default="",
        is_secret=True,
        help="bearer API key (LOADTEST_API_KEY); empty sends no Authorization header",
    )
    parser.add_argument(
        "--model",
        env_var="LOADTEST_MODEL",
        default="sim-fast",
        help="model to call (LOADTEST_MODEL, default sim-fast)",
    )
    parser.add_argument(
        "--think-min",
        env_var="LOADTEST_THINK_MIN",
        type=float,
        default=0.0,
        help="shortest think time between a user's requests, seconds",
    )
    parser.add_argument(
        "--think-max",
        env_var="LOADTEST_THINK_MAX",
        type=float,
        default=1.0,
        help="longest think time, seconds (0 and 0: a closed loop with no pause)",
    )
    parser.add_argument(
        "--bad-share",
        env_var="LOADTEST_BAD_SHARE",
        type=float,
        default=0.03,
        help="share of executor requests that are invalid and must get 422",
    )
    parser.add_argument(
        "--p95-ms",
        env_var="LOADTEST_P95_MS",
        type=float,
        default=0,
        help="fail the run if any request entry has a p95 above this (0: no bound)",
    )
    parser.add_argument(
        "--overload-ok",
        env_var="LOADTEST_OVERLOAD_OK",
        action="store_true",
        default=False,
        help="count 503 overloaded (with Retry-After) as expected, under its own name",
    )
    parser.add_argument(
        "--dispatcher-host",
        env_var="LOADTEST_DISPATCHER_HOST",
        default="",
        help="base URL of the dispatcher when it differs from --host",
    )
    parser.add_argument(
        "--job-questions",
        env_var="LOADTEST_JOB_QUESTIONS",
        type=int,
        default=3,
        help="questions per job",
    )
    parser.add_argument(
        "--job-models",
        env_var="LOADTEST_JOB_MODELS",
        default="",
        help="comma-separated models of a job (default: --model)",
    )
    parser.add_argument(
        "--job-regions",
        env_var="LOADTEST_JOB_REGIONS",
        default="",
        help="comma-separated regions of a job (default: every region serving the model)",
    )
    parser.add_argument(
        "--job-timeout",
        env_var="LOADTEST_JOB_TIMEOUT",
        type=float,
        default=120,
        help="seconds a job may take from submit to complete results",
    )
    parser.add_argument(
        "--poll-interval",
        env_var="LOADTEST_POLL_INTERVAL",
        type=float,
        default=0.5,
        help="seconds between two GET /jobs/<id> of one user",
    )


def _auth(options: Any) -> dict[str, str]:
    """The Authorization header of ``--api-key``, or none."""
    return {"Authorization": f"Bearer {options.api_key}"} if options.api_key else {}


def _error_code(response: Any) -> str:
    """The ``error.code`` of a JSON error body, or "" when there is none."""
    try:
        return str(response.json()["error"]["code"])
    except Exception:
        return ""


class _ThinkingUser(FastHttpUser):
    """Think time from the options, read on every wait so the web UI can change it."""

    abstract = True

    def wait_time(self) -> float:
        options = self.environment.parsed_options
        low, high = options.think_min, max(options.think_max, options.think_min)
        return random.uniform(low, high)


class ExecutorUser(_ThinkingUser):
    """Calls ``POST /execute`` as a mix of real clients would."""

    abstract = TARGET not in {"executor", "all"}

    def on_start(self) -> None:
        self.options = self.environment.parsed_options
        self.headers = _auth(self.options)

    @task
    def execute(self) -> None:
        if random.random() < self.options.bad_share:
            self.invalid()
        else:
            self.valid()

    def _body(self) -> dict[str, Any]:
        _, low, high = random.choices(PROMPT_MIX, weights=[band[0] for band in PROMPT_MIX])[0]
        size = random.randint(low, high)
        start = random.randint(0, len(CORPUS) - size)
        text = CORPUS[start : start + size]
        body: dict[str, Any] = {
            "model": self.options.model,
            "max_tokens": random.choice([16, 64, 256, 512]),
            "temperature": random.choice([0.0, 0.2, 0.7, 1.0]),
            "request_id": "lt-" + uuid.uuid4().hex,
        }
        if random.random() < 0.5:
            body["seed"] = random.randint(0, 2**31 - 1)
        if random.random() < MESSAGES_SHARE:
            body["messages"] = [
                {"role": "system", "content": "Answer in one sentence."},
                {"role": "user", "content": text[: size // 2] or "hi"},
                {"role": "assistant", "content": "Noted."},
                {"role": "user", "content": text[size // 2 :] or "hi"},
            ]
        else:
            body["prompt"] = text
        return body

    def valid(self) -> None:
        body = self._body()
        with self.client.post(
            EXECUTE, json=body, headers=self.headers, name=EXECUTE, catch_response=True
        ) as response:
            if response.status_code == 503 and self.options.overload_ok:
                if _error_code(response) == "overloaded" and response.headers.get("Retry-After"):
                    response.request_meta["name"] = OVERLOADED_NAME
                    response.success()
                else:
                    response.failure("503 without the overloaded error or Retry-After")
                return
            if response.status_code != 200:
                response.failure(
                    f"status {response.status_code} {_error_code(response) or 'no error code'}"
                )
                return
            try:
                answer = response.json()
            except Exception:
                response.failure("200 answer is not JSON")
                return
            if answer.get("request_id") != body["request_id"]:
                response.failure("request_id not echoed")
            elif answer.get("model") != body["model"] or not isinstance(answer.get("output"), str):
                response.failure("answer lacks model or output")
            else:
                response.success()

    def invalid(self) -> None:
        what, bad, field = random.choice(BAD_REQUESTS)
        body = {"model": self.options.model, **bad}
        if what == "no model":
            del body["model"]
        with self.client.post(
            EXECUTE, json=body, headers=self.headers, name=BAD_NAME, catch_response=True
        ) as response:
            text = response.text or ""
            if response.status_code != 422:
                response.failure(f"{what}: expected 422, got {response.status_code}")
            elif _error_code(response) != "validation_error":
                response.failure(f"{what}: 422 without error code validation_error")
            elif field and field not in (response.json()["error"].get("details") or {}):
                response.failure(f"{what}: 422 details do not name {field!r}")
            elif len(text) > MAX_ERROR_BYTES or "Traceback" in text:
                response.failure(f"{what}: 422 body leaks input or a stack trace")
            elif self.options.api_key and self.options.api_key in text:
                response.failure(f"{what}: 422 body contains the API key")
            else:
                response.success()


def _job_finished(status: dict[str, Any]) -> bool:
    """Whether a ``GET /jobs/<id>`` body says every execution reached a final state.

    Tolerant of the shapes the contract allows: a job ``state``/``status``; a
    ``progress`` object with ``done``/``finished`` and ``total``, or a fraction;
    or ``counts`` per state (optionally per region).
    """
    for key in ("state", "status"):
        if str(status.get(key, "")).lower() in FINAL_JOB_STATES:
            return True
    progress = status.get("progress")
    if isinstance(progress, dict):
        total = progress.get("total", status.get("total"))
        done = progress.get("done", progress.get("finished", progress.get("final")))
        if isinstance(total, int) and isinstance(done, int) and total > 0:
            return done >= total
    elif isinstance(progress, int | float) and not isinstance(progress, bool):
        return progress >= (100 if progress > 1 else 1)
    counts = status.get("counts")
    if isinstance(counts, dict) and counts:
        flat: dict[str, int] = {}
        for key, value in counts.items():
            if isinstance(value, dict):  # per region: {region: {state: n}}
                for state, n in value.items():
                    flat[state] = flat.get(state, 0) + int(n)
            else:
                flat[key] = flat.get(key, 0) + int(value)
        pending = sum(n for s, n in flat.items() if s not in FINAL_EXECUTION_STATES)
        return pending == 0 and sum(flat.values()) > 0
    return False


def _executions(results: Any) -> list[dict[str, Any]]:
    if isinstance(results, list):
        return results
    for key in ("executions", "results", "items"):
        if isinstance(results, dict) and isinstance(results.get(key), list):
            return list(results[key])
    return []


class DispatcherUser(_ThinkingUser):
    """Submits small jobs and follows each one to complete, checked results."""

    abstract = TARGET not in {"dispatcher", "all"}

    def on_start(self) -> None:
        self.options = self.environment.parsed_options
        self.headers = _auth(self.options)
        if self.options.dispatcher_host:
            self.client.base_url = self.options.dispatcher_host.rstrip("/")
        self.models = [m for m in self.options.job_models.split(",") if m] or [self.options.model]
        self.regions = [r for r in self.options.job_regions.split(",") if r]

    def _report_job(
        self, started: float, executions: int, error: str | None, job_id: str = "", detail: str = ""
    ) -> None:
        """One ``JOB`` entry per job. The error is kept generic so that locust's failure
        table groups jobs by what went wrong; the job id and details go to the log."""
        _jobs["failed" if error else "completed"] += 1
        if error:
            logger.warning("job %s: %s %s", job_id, error, detail)
        self.environment.events.request.fire(
            request_type="JOB",
            name=JOB_NAME,
            response_time=(time.monotonic() - started) * 1000,
            response_length=executions,
            response=None,
            context={},
            exception=RuntimeError(error) if error else None,
        )

    @task
    def job(self) -> None:
        options, tag = self.options, uuid.uuid4().hex[:8]
        questions = [
            f"[loadtest {tag}] question {i}: {CORPUS[i * 40 : i * 40 + 80]}?"
            for i in range(options.job_questions)
        ]
        body: dict[str, Any] = {"questions": questions, "models": self.models}
        if self.regions:
            body["regions"] = self.regions
        started = time.monotonic()
        with self.client.post(
            "/jobs", json=body, headers=self.headers, name="/jobs", catch_response=True
        ) as response:
            job_id = None
            if response.status_code == 201:
                try:
                    job_id = response.json().get("id")
                except Exception:
                    job_id = None
            if not job_id:
                response.failure(f"expected 201 with an id, got {response.status_code}")
                return
        _jobs["submitted"] += 1
        deadline = started + options.job_timeout
        while True:
            with self.client.get(
                f"/jobs/{job_id}", headers=self.headers, name="/jobs/[id]", catch_response=True
            ) as response:
                if response.status_code != 200:
                    response.failure(f"status {response.status_code}")
                    self._report_job(started, 0, f"GET /jobs/[id]: {response.status_code}", job_id)
                    return
                finished = _job_finished(response.json())
            if time.monotonic() > deadline:
                late = f"did not complete in {options.job_timeout:g} s"
                self._report_job(started, 0, late, job_id)
                return
            if finished:
                break
            gevent.sleep(min(options.poll_interval, max(0.0, deadline - time.monotonic())))
        with self.client.get(
            f"/jobs/{job_id}/results",
            headers=self.headers,
            name="/jobs/[id]/results",
            catch_response=True,
        ) as response:
            if response.status_code != 200:
                response.failure(f"status {response.status_code}")
                failed = f"GET /jobs/[id]/results: {response.status_code}"
                self._report_job(started, 0, failed, job_id)
                return
            executions = _executions(response.json())
        expected = len(questions) * len(self.models) * max(1, len(self.regions))
        missing = [
            e
            for e in executions
            if e.get("state") != "succeeded" or not (e.get("output") or "").strip()
        ]
        error: str | None = None
        detail = ""
        if len(executions) < expected:
            error = "fewer executions than questions x models x regions"
            detail = f"{len(executions)} < {expected}"
        elif missing:
            error = "executions without a result"
            sample = missing[0]
            detail = (
                f"{len(missing)} of {len(executions)}, e.g. state {sample.get('state')} "
                f"error {sample.get('last_error')}"
            )
        self._report_job(started, len(executions), error, job_id, detail)


@events.quitting.add_listener
def _check_thresholds(environment: Environment, **_: Any) -> None:
    """Turn the thresholds into the process exit code (1 when any fails)."""
    if isinstance(environment.runner, WorkerRunner) or environment.runner is None:
        return  # the master judges a distributed run
    options = environment.parsed_options
    stats = environment.stats
    problems: list[str] = []
    if stats.total.num_requests == 0:
        problems.append("no request was made")
    if stats.total.num_failures:
        kinds = sorted(
            (e.occurrences, f"{e.method} {e.name}: {e.error}") for e in stats.errors.values()
        )
        shown = "; ".join(f"{n}x {what}" for n, what in reversed(kinds[-5:]))
        problems.append(f"{stats.total.num_failures} unexpected failures ({shown})")
    if environment.runner.exceptions:
        problems.append(f"{len(environment.runner.exceptions)} exceptions in the user code")
    bound = getattr(options, "p95_ms", 0) if options else 0
    if bound:
        for entry in stats.entries.values():
            if entry.method == "JOB" or not entry.num_requests:
                continue
            p95 = entry.get_response_time_percentile(0.95)
            if p95 > bound:
                problems.append(f"p95 of {entry.method} {entry.name} is {p95:g} ms > {bound:g} ms")
    if _jobs["submitted"]:
        unfinished = _jobs["submitted"] - _jobs["completed"] - _jobs["failed"]
        logger.info(
            "jobs: %(submitted)d submitted, %(completed)d completed, %(failed)d failed", _jobs
        )
        if unfinished:
            logger.warning("%d jobs were still running when the test stopped", unfinished)
    for problem in problems:
        logger.error("THRESHOLD FAILED: %s", problem)
    verdict_file = os.environ.get("LOADTEST_VERDICT_FILE")
    if verdict_file:  # run.py puts the verdict and its reasons at the top of the HTML report
        with open(verdict_file, "w") as handle:
            json.dump({"problems": problems}, handle)
    if problems:
        environment.process_exit_code = 1
    else:
        logger.info("all thresholds passed")
    if options and getattr(options, "csv_prefix", None):
        # Locust rewrites PREFIX_stats.csv once a second from a greenlet and only
        # closes the file after this event: yield one interval so the CSV holds the
        # final figures (the same ones as the console and the HTML report).
        gevent.sleep(CSV_STATS_INTERVAL_SEC + 0.2)
