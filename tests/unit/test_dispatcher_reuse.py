"""Reuse of identical calls (params.reuse), stepped on the memory store: what is reused,
what never is (errors, other regions, other tenants, sampling), and how it is recorded."""

from __future__ import annotations

from typing import Any

from test_dispatcher_steps import CONFIG, Stepper, down, regions

from executor_service.dispatcher import metrics
from executor_service.dispatcher.store.base import Failover, NewJob, State


def job(s: Stepper, params: dict[str, Any], where: list[str], tenant: str = "t", n: int = 2) -> str:
    new = NewJob(
        tenant=tenant,
        questions=[f"q{i}" for i in range(n)],
        models=["m"],
        regions_by_model={"m": where},
        failover=Failover.NONE,
        max_attempts=1,
        params=params,
    )
    created, _ = s.store.create_job(new, s.clock())
    return created.id


def run(s: Stepper, job_id: str) -> list[Any]:
    s.dispatcher.step()
    return s.store.executions(job_id)


def reused_count(region: str) -> float:
    return metrics.REUSED.labels(region)._value.get()  # type: ignore[attr-defined]


def test_an_identical_deterministic_call_is_reused_with_its_origin() -> None:
    s = Stepper(CONFIG, regions(a=4))
    first = job(s, {"reuse": True, "temperature": 0, "max_tokens": 8}, ["a"])
    originals = run(s, first)
    assert [e.state for e in originals] == [State.SUCCEEDED] * 2
    calls = len(s.log)
    before = reused_count("a")

    second = job(s, {"reuse": True, "temperature": 0, "max_tokens": 8}, ["a"])
    again = run(s, second)
    assert len(s.log) == calls, "the executor was called again"
    assert [e.state for e in again] == [State.SUCCEEDED] * 2
    for original, reused in zip(originals, again, strict=True):
        assert reused.output == original.output
        assert reused.result is not None
        assert reused.result["reused_from"]["execution_id"] == original.id
        assert reused.result["reused_from"]["job_id"] == first
    assert reused_count("a") == before + 2


def test_no_reuse_without_the_option_across_regions_tenants_or_parameters() -> None:
    s = Stepper(CONFIG, regions(a=8, b=8))
    job(s, {"reuse": True, "seed": 3}, ["a"])
    s.dispatcher.step()
    calls = len(s.log)
    # not asked for; another region; another tenant; other parameters; sampling (no seed)
    for params, where, tenant in [
        ({"seed": 3}, ["a"], "t"),
        ({"reuse": True, "seed": 3}, ["b"], "t"),
        ({"reuse": True, "seed": 3}, ["a"], "other"),
        ({"reuse": True, "seed": 4}, ["a"], "t"),
        ({"reuse": True, "temperature": 0.7}, ["a"], "t"),
    ]:
        fresh = job(s, params, where, tenant)
        executions = run(s, fresh)
        assert len(s.log) == calls + 2, (params, where, tenant)
        calls = len(s.log)
        assert all(e.result is not None and "reused_from" not in e.result for e in executions)


def test_errors_are_never_reused() -> None:
    s = Stepper(CONFIG, regions(a=4))
    s.behaviours["a"] = down
    failed = job(s, {"reuse": True, "temperature": 0}, ["a"])
    assert [e.state for e in run(s, failed)] == [State.DEAD] * 2
    del s.behaviours["a"]
    calls = len(s.log)
    retried = job(s, {"reuse": True, "temperature": 0}, ["a"])
    assert [e.state for e in run(s, retried)] == [State.SUCCEEDED] * 2
    assert len(s.log) == calls + 2  # called for real


def test_the_option_is_a_job_parameter_and_results_show_reused_from(tmp_path: Any) -> None:
    from test_dispatcher_api import ALICE, Env

    env = Env(tmp_path)
    body = {"questions": ["q"], "models": ["m1"], "regions": ["us"], "params": {"reuse": True}}
    r = env.submit(body)
    assert r.status_code == 201, r.get_json()
    assert r.get_json()["params"] == {"reuse": True}
    results = env.client.get(f"/jobs/{r.get_json()['id']}/results", headers=ALICE).get_json()
    assert results["executions"][0]["reused_from"] is None
    bad = env.submit({**body, "params": {"reuse": "maybe"}})
    assert bad.status_code == 422
