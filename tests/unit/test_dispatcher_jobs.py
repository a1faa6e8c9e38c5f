"""Job requests checked against the regions file and the limits, and turned into NewJobs."""

from __future__ import annotations

from typing import Any

import pytest
from marshmallow import ValidationError

from executor_service.dispatcher.jobs import JobLimits, build_job
from executor_service.dispatcher.regions import Regions
from executor_service.dispatcher.schemas import JobRequestSchema
from executor_service.dispatcher.store.base import Failover
from executor_service.errors import ValidationFailed

REGIONS = Regions.from_mapping(
    {
        "regions": {
            "us": {"url": "http://us", "concurrency": 2, "models": ["a", "b"]},
            "eu": {"url": "http://eu", "concurrency": 2, "models": ["a"]},
            "ap": {"url": "http://ap", "concurrency": 2, "models": ["a", "b"]},
        }
    }
)
LIMITS = JobLimits(max_questions=10, max_executions=20)


def load(body: dict[str, Any]) -> dict[str, Any]:
    return JobRequestSchema().load(body)  # type: ignore[no-any-return]


def build(body: dict[str, Any], header: str | None = None, limits: JobLimits = LIMITS) -> Any:
    return build_job(load(body), "t1", REGIONS, limits, header)


def details(body: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    with pytest.raises(ValidationFailed) as info:
        build(body, **kwargs)
    assert info.value.status == 422
    return info.value.details


def test_defaults_every_region_serving_each_model() -> None:
    job = build({"questions": ["q1", "q2"], "models": ["a", "b"]})
    assert job.regions_by_model == {"a": ["us", "eu", "ap"], "b": ["us", "ap"]}
    assert job.tenant == "t1"
    assert (job.failover, job.max_attempts, job.priority) == (Failover.NONE, 3, 0)
    assert job.idempotency_key is None and job.params == {}


def test_requested_regions_and_options_are_kept() -> None:
    job = build(
        {
            "questions": ["q"],
            "models": ["b"],
            "regions": ["ap", "us"],
            "failover": "none",
            "max_attempts": 5,
            "priority": 7,
            "params": {"max_tokens": 10, "temperature": 0.5, "seed": 1},
        },
        header="key-1",
    )
    assert job.regions_by_model == {"b": ["ap", "us"]}
    assert (job.failover, job.max_attempts, job.priority) == (Failover.NONE, 5, 7)
    assert job.params == {"max_tokens": 10, "temperature": 0.5, "seed": 1}
    assert job.idempotency_key == "key-1"


def test_unknown_model_and_region_are_named() -> None:
    assert "models" in details({"questions": ["q"], "models": ["zzz"]})
    got = details({"questions": ["q"], "models": ["a"], "regions": ["mars"]})
    assert "mars" in got["regions"][0]


def test_a_model_not_served_in_a_requested_region_is_refused() -> None:
    got = details({"questions": ["q"], "models": ["b"], "regions": ["us", "eu"]})
    assert "'b' is not served in ['eu']" in got["regions"][0]


def test_duplicates_are_refused() -> None:
    assert "models" in details({"questions": ["q"], "models": ["a", "a"]})
    assert "regions" in details({"questions": ["q"], "models": ["a"], "regions": ["us", "us"]})


def test_size_limits_name_the_field() -> None:
    got = details({"questions": [f"q{i}" for i in range(11)], "models": ["a"]})
    assert "at most 10" in got["questions"][0]
    # 7 questions x (3 + 2) regions = 35 executions > 20
    got = details({"questions": [f"q{i}" for i in range(7)], "models": ["a", "b"]})
    assert "35 executions" in got["questions"][0]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"questions": [], "models": ["a"]}, "questions"),
        ({"questions": ["q"], "models": []}, "models"),
        ({"questions": ["q"], "models": ["a"], "regions": []}, "regions"),
        ({"questions": [""], "models": ["a"]}, "questions"),
        ({"questions": ["q"], "models": ["a"], "max_attempts": 11}, "max_attempts"),
        ({"questions": ["q"], "models": ["a"], "max_attempts": "3"}, "max_attempts"),
        ({"questions": ["q"], "models": ["a"], "failover": "some"}, "failover"),
        ({"questions": ["q"], "models": ["a"], "extra": 1}, "extra"),
        ({"questions": ["q"], "models": ["a"], "params": {"top_p": 1}}, "params"),
        ({"questions": ["q"], "models": ["a"], "params": {"max_tokens": 0}}, "params"),
        ({"models": ["a"]}, "questions"),
    ],
)
def test_schema_refuses_bad_shapes(body: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        load(body)
    assert field in info.value.messages


def test_request_hash_same_for_same_request_and_differs_otherwise() -> None:
    body = {"questions": ["q1"], "models": ["a"], "idempotency_key": "k"}
    same = build(body).request_hash
    assert build({**body, "idempotency_key": "other"}).request_hash == same
    # defaults written out are the same request
    assert build({**body, "failover": "none", "max_attempts": 3}).request_hash == same
    assert build({**body, "questions": ["q2"]}).request_hash != same
    assert build({**body, "priority": 1}).request_hash != same


def test_header_and_body_keys_must_agree() -> None:
    body = {"questions": ["q"], "models": ["a"], "idempotency_key": "k1"}
    assert build(body, header="k1").idempotency_key == "k1"
    assert "idempotency_key" in details(body, header="k2")
    assert "Idempotency-Key" in details({"questions": ["q"], "models": ["a"]}, header=" ")
