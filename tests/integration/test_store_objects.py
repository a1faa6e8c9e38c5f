"""The OpenAI Batch API's objects (files, batches) beside the jobs, on each store kind."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from store_fixtures import PostgresDatabases, sqlite_url

from executor_service.dispatcher.store import Store, open_store
from executor_service.dispatcher.store.objects import StoredObject, objects_for


@pytest.fixture(scope="module")
def postgres_databases() -> Iterator[PostgresDatabases]:
    databases = PostgresDatabases()
    yield databases
    databases.close()


@pytest.fixture(params=["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "postgres":
        databases: PostgresDatabases = request.getfixturevalue("postgres_databases")
        url = databases.create()
    else:
        url = "memory://" if request.param == "memory" else sqlite_url(tmp_path)
    store = open_store(url)
    yield store
    store.close()
    if request.param == "postgres":
        databases.drop(url)


def test_put_get_update_list_by_tenant(store: Store) -> None:
    objects = objects_for(store)
    assert objects_for(store) is objects
    data = b'{"custom_id": "a"}\n\x00\xff'
    objects.put(StoredObject("file", "file-1", "acme", 10.0, {"id": "file-1"}, data))
    objects.put(StoredObject("batch", "batch_1", "acme", 11.0, {"status": "in_progress"}))
    objects.put(StoredObject("batch", "batch_2", "acme", 12.0, {"status": "failed"}))
    objects.put(StoredObject("batch", "batch_3", "other", 13.0, {"status": "failed"}))

    found = objects.get("acme", "file", "file-1", content=True)
    assert found is not None and found.content == data and found.body == {"id": "file-1"}
    without = objects.get("acme", "file", "file-1")
    assert without is not None and without.content is None
    assert objects.get("other", "file", "file-1") is None  # another tenant's
    assert objects.get("acme", "batch", "file-1") is None  # another kind

    objects.update_body("acme", "batch", "batch_1", {"status": "completed", "n": [1, 2]})
    batch = objects.get("acme", "batch", "batch_1")
    assert batch is not None and batch.body == {"status": "completed", "n": [1, 2]}
    objects.update_body("other", "batch", "batch_2", {"status": "hijacked"})
    unchanged = objects.get("acme", "batch", "batch_2")
    assert unchanged is not None and unchanged.body == {"status": "failed"}

    assert [o.id for o in objects.list("acme", "batch")] == ["batch_2", "batch_1"]
    assert [o.id for o in objects.list("other", "batch")] == ["batch_3"]
