"""The provider-side rate limit: OpenAI's reset durations and headers, the token bucket
of the simulated provider (on a fake clock), shared through a file across processes,
and the executor's 429 ``rate_limited`` answer for it."""

from __future__ import annotations

import multiprocessing
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from support import write_catalog

from executor_service import create_app
from executor_service.config import Settings
from executor_service.executor.providers.ratelimit import (
    RateLimitInfo,
    TokenBucket,
    format_duration,
    limits_from_headers,
    parse_duration,
)


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("1m30.5s", 90.5),
        ("20ms", 0.02),
        ("1h2m3s", 3723.0),
        ("2.5", 2.5),
        (" 7 ", 7.0),
    ],
)
def test_reset_durations_are_read_as_openai_writes_them(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", [None, "", "soon", "-3", "1x", "nan", "m"])
def test_unreadable_reset_durations_are_none(text: str | None) -> None:
    assert parse_duration(text) is None


def test_a_reset_given_as_a_unix_time_is_the_time_left() -> None:
    assert parse_duration("1700000030", now=1700000000.0) == pytest.approx(30.0)


def test_durations_round_trip() -> None:
    for seconds in (0.02, 1.5, 59.0, 360.0, 90.25):
        assert parse_duration(format_duration(seconds)) == pytest.approx(seconds, abs=0.001)


def test_limits_from_headers_reads_openai_names() -> None:
    info = limits_from_headers(
        {
            "x-ratelimit-limit-requests": "60",
            "x-ratelimit-remaining-requests": "0",
            "x-ratelimit-reset-requests": "1s",
            "x-ratelimit-limit-tokens": "150000",
            "x-ratelimit-remaining-tokens": "149000",
            "x-ratelimit-reset-tokens": "400ms",
        }
    )
    assert info == RateLimitInfo(60, 0, 1.0, 150000, 149000, 0.4)
    # only the exhausted limit says how long to wait
    assert info.wait_s() == pytest.approx(1.0)
    assert limits_from_headers({}).empty


def test_the_bucket_admits_a_window_then_refuses_with_the_wait() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rpm=3, tpm=None, window_s=6.0, clock=clock)
    assert [bucket.acquire().admitted for _ in range(3)] == [True, True, True]
    refused = bucket.acquire()
    assert not refused.admitted
    assert refused.retry_after_s == pytest.approx(2.0)  # one request refills in 6/3 s
    assert refused.info.remaining_requests == 0
    assert refused.info.limit_requests == 3
    assert refused.info.reset_requests_s == pytest.approx(6.0)
    clock.now += 2.0
    assert bucket.acquire().admitted
    assert not bucket.acquire().admitted


def test_a_short_burst_enforces_a_per_minute_limit_per_second() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rpm=300, tpm=None, window_s=60.0, clock=clock, burst_s=1.0)
    assert sum(bucket.acquire().admitted for _ in range(20)) == 5  # 300 rpm: 5 at once
    clock.now += 1.0
    assert sum(bucket.acquire().admitted for _ in range(20)) == 5


def test_the_bucket_paces_tokens_and_settles_real_usage() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rpm=None, tpm=1000, window_s=10.0, clock=clock)
    assert bucket.acquire(600).admitted
    refused = bucket.acquire(600)
    assert not refused.admitted
    assert refused.retry_after_s == pytest.approx(2.0)  # 200 more tokens at 100/s
    bucket.settle(600, 100)  # the call used 100 of the 600 it was charged
    assert bucket.acquire(600).admitted
    too_large = bucket.acquire(1001)
    assert too_large.too_large and not too_large.admitted


def _drain(path: str, n: int, out: Any) -> None:
    bucket = TokenBucket(rpm=50, tpm=None, window_s=3600.0, state_file=Path(path))
    out.put(sum(bucket.acquire().admitted for _ in range(n)))


def test_processes_naming_one_state_file_share_one_bucket(tmp_path: Path) -> None:
    path = str(tmp_path / "bucket.json")
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_drain, args=(path, 40, out)) for _ in range(3)]
    for proc in procs:
        proc.start()
    admitted = [out.get(timeout=60) for _ in procs]
    for proc in procs:
        proc.join(timeout=30)
    # 120 asked, one hour's window of 50: exactly 50 admitted across the three processes
    assert sum(admitted) == 50


@pytest.fixture
def limited_client(tmp_path: Path) -> FlaskClient:
    catalog = write_catalog(
        tmp_path / "catalog.toml",
        {
            "sim-rpm": {
                "provider": "simulated",
                "rpm": 2,
                "tpm": 10_000,
                "rate_window_s": 60,
                "rate_log": str(tmp_path / "arrivals.log"),
            },
            "sim-small-tpm": {"provider": "simulated", "tpm": 100},
        },
    )
    settings = Settings.from_env(environ={"ES_CATALOG": str(catalog), "ES_REGION": "unit"})
    return create_app({"TESTING": True}, settings=settings).test_client()


def test_beyond_its_rpm_the_simulated_provider_is_a_429_rate_limited(
    limited_client: FlaskClient, tmp_path: Path
) -> None:
    body = {"model": "sim-rpm", "prompt": "What is 2+2?", "max_tokens": 16}
    assert [limited_client.post("/execute", json=body).status_code for _ in range(2)] == [200, 200]
    r = limited_client.post("/execute", json=body)
    assert r.status_code == 429
    assert r.mimetype == "application/json"
    error = r.get_json()["error"]
    assert error["code"] == "rate_limited"
    assert "rate" in error["message"]
    details = error["details"]
    assert details["provider"] == "simulated"
    assert details["provider_status"] == 429
    assert 29 <= details["retry_after_s"] <= 30  # one request of 2/min refills in 30 s
    assert details["ratelimit"]["remaining_requests"] == 0
    assert details["ratelimit"]["limit_requests"] == 2
    assert details["ratelimit"]["limit_tokens"] == 10_000
    assert 0 < details["ratelimit"]["reset_requests_s"] <= 60
    assert r.headers["Retry-After"] == "30"
    assert 29_000 <= int(r.headers["retry-after-ms"]) <= 30_000
    assert r.headers["x-ratelimit-remaining-requests"] == "0"
    assert r.headers["x-ratelimit-limit-requests"] == "2"
    assert parse_duration(r.headers["x-ratelimit-reset-requests"]) is not None
    # every arrival is in the provider's log, refused ones too
    lines = (tmp_path / "arrivals.log").read_text().splitlines()
    assert [line.split()[1] for line in lines] == ["1", "1", "0"]


def test_a_request_larger_than_the_whole_tpm_is_a_422(limited_client: FlaskClient) -> None:
    r = limited_client.post(
        "/execute", json={"model": "sim-small-tpm", "prompt": "x", "max_tokens": 200}
    )
    assert r.status_code == 422
    error = r.get_json()["error"]
    assert error["code"] == "validation_error"
    assert "tokens" in error["details"]["prompt"][0]


def test_the_openapi_document_lists_the_429(limited_client: FlaskClient) -> None:
    doc = limited_client.get("/openapi.json").get_json()
    responses = doc["paths"]["/execute"]["post"]["responses"]
    assert "rate_limited" in responses["429"]["description"]
