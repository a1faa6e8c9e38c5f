"""A database made by the first version keeps its jobs through migrations 0002 and 0003_workbench:
old jobs read with the new fields' defaults and can be listed and retried."""

from __future__ import annotations

import sqlite3
from importlib import resources
from pathlib import Path

from executor_service.dispatcher.store import open_store
from executor_service.dispatcher.store.base import JobQuery, RetryRequest, State


def test_a_first_version_sqlite_database_upgrades_in_place(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    initial = resources.files("executor_service.dispatcher.store").joinpath(
        "sql", "sqlite", "0001_initial.sql"
    )
    with sqlite3.connect(path) as db:
        db.executescript(initial.read_text("utf-8"))
        db.execute(
            "CREATE TABLE schema_migrations"
            " (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"
        )
        db.execute("INSERT INTO schema_migrations VALUES (1, 'initial', 0)")
        db.execute(
            "INSERT INTO jobs (id, tenant, failover, max_attempts, priority, questions, models,"
            " regions_by_model, params, total, created_at) VALUES ('j1', 't', 'any', 3, 0,"
            " '[\"q\"]', '[\"m\"]', '{\"m\": [\"r1\"]}', '{}', 1, 1.0)"
        )
        db.execute(
            "INSERT INTO executions (job_id, tenant, question_index, question, model,"
            " requested_region, state, attempts, max_attempts, failover, priority,"
            " job_created_at, created_at) VALUES ('j1', 't', 0, 'q', 'm', 'r1', 'dead', 3, 3,"
            " 'any', 0, 1.0, 1.0)"
        )
    store = open_store(f"sqlite:///{path}")
    try:
        job = store.get_job("t", "j1")
        assert job is not None and (job.name, job.tags, job.samples) == (None, [], 1)
        (e,) = store.executions("j1")
        assert (e.sample, e.messages, e.attempt_base) == (0, None, 0)
        assert [j.id for j in store.list_jobs(JobQuery("t", 10, state="finished"))] == ["j1"]
        assert store.retry_job(RetryRequest("t", "j1", 2.0)) == 1
        (e,) = store.executions("j1")
        assert (e.state, e.attempts - e.attempt_base) == (State.QUEUED, 0)
    finally:
        store.close()
