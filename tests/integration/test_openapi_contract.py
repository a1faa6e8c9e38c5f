"""The OpenAPI documents are true to the wire: schemathesis generates requests from each
service's own ``/openapi.json`` and checks every answer against it (status codes listed,
bodies matching their schemas, content types, no 500), on both services. Examples are
bounded so ``make test`` stays fast; ``ES_SCHEMATHESIS_EXAMPLES`` raises them."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import schemathesis
from flask import Flask
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from executor_service import create_app
from executor_service.dispatcher.api import create_dispatcher_app
from executor_service.dispatcher.config import DispatcherSettings
from executor_service.dispatcher.store import open_store
from executor_service.executor.config import ExecutorSettings

EXAMPLES = int(os.environ.get("ES_SCHEMATHESIS_EXAMPLES", "25"))
REGIONS_TOML = """
[regions.us]
url = "http://127.0.0.1:9"
concurrency = 2
models = ["sim"]
"""
KEY = {"Authorization": "Bearer key-a"}


@pytest.fixture(scope="module")
def executor_app(tmp_path_factory: pytest.TempPathFactory) -> Flask:
    catalog = tmp_path_factory.mktemp("st") / "catalog.toml"
    catalog.write_text('[models."sim"]\nprovider = "simulated"\n')
    settings = ExecutorSettings.from_env(
        environ={"ES_CATALOG": str(catalog), "ES_API_KEYS": "a:key-a"}
    )
    return create_app({"TESTING": False}, settings=settings)


@pytest.fixture(scope="module")
def dispatcher_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flask]:
    tmp = tmp_path_factory.mktemp("st-d")
    (tmp / "regions.toml").write_text(REGIONS_TOML)
    settings = DispatcherSettings.from_env(
        environ={
            "ES_REGIONS_FILE": str(tmp / "regions.toml"),
            "ES_DATABASE_URL": f"sqlite:///{tmp / 'd.db'}",
            "ES_API_KEYS": "alice:key-a",
        }
    )
    store = open_store(settings.database_url)
    yield create_dispatcher_app({"TESTING": False}, settings=settings, store=store)
    store.close()


# Every check but "a schema-valid request is accepted": what OpenAPI 3.0 cannot say is
# refused with a documented 4xx on purpose (exactly one of prompt and messages; a model
# in the catalog or served by a region; a job within ES_MAX_JOB_EXECUTIONS).
SEMANTIC = [positive_data_acceptance]

BOUNDED = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
    database=None,
)


def check_every_operation(app: Flask) -> None:
    """Every operation of the app's own document, ``EXAMPLES`` generated cases each,
    every schemathesis check; the failures of all operations reported together."""
    schema = schemathesis.openapi.from_wsgi("/openapi.json", app, headers=KEY)
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert operations
    for operation in operations:

        @given(case=operation.as_strategy())
        @BOUNDED
        def run(case: schemathesis.Case) -> None:
            case.call_and_validate(headers=KEY, excluded_checks=SEMANTIC)

        try:
            run()
        except Exception as exc:  # collect every operation's failure, then fail once
            failures.append(f"{operation.label}: {exc}")
    assert not failures, "\n\n".join(failures)


def test_executor_answers_as_its_openapi_says(executor_app: Flask) -> None:
    check_every_operation(executor_app)


def test_dispatcher_answers_as_its_openapi_says(dispatcher_app: Flask) -> None:
    check_every_operation(dispatcher_app)
