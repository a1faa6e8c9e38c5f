"""The dispatcher's settings (``ES_*``): the store, the regions, leases, retries, circuits
and job limits (DispatcherSettings, for ``dispatcher api`` and ``dispatcher worker``), and
where the CLI finds the API (ClientSettings, for submit/status/results)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..config import (
    CommonSettings,
    ConfigError,
    EnvSettings,
    _choice,
    _fraction,
    _non_negative_float,
    _optional_path,
    _parse_bool,
    _positive_float,
    _positive_int,
)


@dataclass(frozen=True)
class DispatcherSettings(CommonSettings):
    """The dispatcher's settings (API and region workers read the same ones)."""

    @property
    def log_region(self) -> str | None:
        """None: a dispatcher serves many regions, so ES_REGION (an executor's identity,
        "local" by default) would mislabel its lines; a worker's lines carry their region."""
        return None

    # Dispatcher: the store and the regions it fans out to.
    database_url: str = field(
        default="sqlite:///executor-service.db", metadata={"env": "ES_DATABASE_URL"}
    )
    regions_file: Path | None = field(
        default=None, metadata={"env": "ES_REGIONS_FILE", "parse": _optional_path}
    )
    # Job size limits (questions x models x regions executions at most).
    max_job_executions: int = field(
        default=100_000, metadata={"env": "ES_MAX_JOB_EXECUTIONS", "parse": _positive_int}
    )
    # Fairness: at most this many executions per tenant per claim cycle.
    tenant_batch: int = field(
        default=20, metadata={"env": "ES_TENANT_BATCH", "parse": _positive_int}
    )
    lease_s: float = field(default=30.0, metadata={"env": "ES_LEASE_S", "parse": _positive_float})
    # Dispatcher runtime. Job size: questions per job (each question runs once per
    # model and region, so this bounds the request body and the results page).
    max_job_questions: int = field(
        default=10_000, metadata={"env": "ES_MAX_JOB_QUESTIONS", "parse": _positive_int}
    )
    # Retry backoff: base * 2**(attempt-1), capped, with jitter (full spreads a
    # burst of failures the most; equal keeps at least half the delay).
    backoff_base_s: float = field(
        default=1.0, metadata={"env": "ES_BACKOFF_BASE_S", "parse": _positive_float}
    )
    backoff_max_s: float = field(
        default=60.0, metadata={"env": "ES_BACKOFF_MAX_S", "parse": _positive_float}
    )
    backoff_jitter: str = field(
        default="full",
        metadata={"env": "ES_BACKOFF_JITTER", "parse": _choice("full", "equal", "none")},
    )
    # Circuit breaker per region: open after this many consecutive failures, stop
    # claiming for the cool-down, then let one probe call through (half-open).
    circuit_threshold: int = field(
        default=5, metadata={"env": "ES_CIRCUIT_THRESHOLD", "parse": _positive_int}
    )
    circuit_cooldown_s: float = field(
        default=30.0, metadata={"env": "ES_CIRCUIT_COOLDOWN_S", "parse": _positive_float}
    )
    # A failover-any retry that failed in a region is taken back by that region only
    # once it has been due this long: other (healthy) regions get it first.
    retry_handoff_s: float = field(
        default=0.5, metadata={"env": "ES_RETRY_HANDOFF_S", "parse": _non_negative_float}
    )
    # How often an idle region asks the store for work submitted by another
    # process; local completions and due retries wake it at once. 50 ms keeps a
    # retry started by another process within backoff + 100 ms (D2) even with a
    # slow claim; an idle claim is one indexed query, so 20/s per region is cheap.
    claim_poll_s: float = field(
        default=0.05, metadata={"env": "ES_CLAIM_POLL_S", "parse": _positive_float}
    )
    # Schedule-to-start (DESIGN.md, Timeouts): failover-any work queued this long in its
    # region may be taken by an idle region serving the model; 0: never. 30 s: a region
    # that has not started a call in that long is backed up or stuck, and moving work is
    # cheap (it has not run); short enough to matter within a batch of minutes.
    schedule_to_start_s: float = field(
        default=30.0, metadata={"env": "ES_SCHEDULE_TO_START_S", "parse": _non_negative_float}
    )
    # Hedged calls (hedging.py): off by default, because a hedge is a second billed call
    # and a user counting calls against a quota must ask for it; the rules below keep it
    # cheap once on. A straggler (running longer than its (region, model)'s observed p95)
    # of a job in its tail (at most ES_HEDGE_TAIL_FRACTION of its executions left) gets a
    # second copy, within ES_HEDGE_MAX_FRACTION of the job's executions in extra calls.
    hedge: bool = field(default=False, metadata={"env": "ES_HEDGE", "parse": _parse_bool})
    hedge_max_fraction: float = field(
        default=0.05, metadata={"env": "ES_HEDGE_MAX_FRACTION", "parse": _fraction}
    )
    hedge_tail_fraction: float = field(
        default=0.1, metadata={"env": "ES_HEDGE_TAIL_FRACTION", "parse": _fraction}
    )
    # A job's deadline (schedule-to-close) when it gives no deadline_s: what is left of
    # it then ends dead with deadline_exceeded. Deferrals (rate limits) are bounded by
    # it, not by max_attempts; a day covers any batch a provider's limits allow.
    job_deadline_s: float = field(
        default=86400.0, metadata={"env": "ES_JOB_DEADLINE_S", "parse": _positive_float}
    )
    # On SIGTERM, in-flight calls get this long to finish before their leases
    # are released for another worker.
    shutdown_grace_s: float = field(
        default=30.0, metadata={"env": "ES_SHUTDOWN_GRACE_S", "parse": _positive_float}
    )

    def check(self, environ: Mapping[str, str]) -> None:
        super().check(environ)
        if self.backoff_base_s > self.backoff_max_s:
            raise ConfigError(
                f"ES_BACKOFF_BASE_S={self.backoff_base_s:g} is above ES_BACKOFF_MAX_S="
                f"{self.backoff_max_s:g}: the base delay must be <= the cap"
            )


@dataclass(frozen=True)
class ClientSettings(EnvSettings):
    """Where the CLI (submit, status, results) finds the dispatcher API, and its key."""

    # Where the CLI (submit, status, results) finds the dispatcher API, and its key.
    dispatcher_url: str = field(
        default="http://127.0.0.1:8100", metadata={"env": "ES_DISPATCHER_URL"}
    )
    dispatcher_key: str = field(default="", metadata={"env": "ES_DISPATCHER_KEY"})
