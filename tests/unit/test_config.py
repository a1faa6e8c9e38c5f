from __future__ import annotations

from pathlib import Path

import pytest

from executor_service.config import ConfigError, Settings


def test_defaults_without_environment() -> None:
    s = Settings.from_env(environ={})
    assert s.region == "local"
    assert s.catalog_path is None
    assert s.max_body_bytes == 1024 * 1024
    assert s.timeout_cap_s == 50.0


def test_values_are_parsed_and_typed() -> None:
    s = Settings.from_env(
        environ={
            "ES_REGION": "eu-west",
            "ES_CATALOG": "/tmp/c.toml",
            "ES_ALLOW_OPEN": "yes",
            "ES_MAX_IN_FLIGHT": "3",
            "ES_TIMEOUT_CAP_S": "2.5",
        }
    )
    assert (s.region, s.catalog_path, s.allow_open) == ("eu-west", Path("/tmp/c.toml"), True)
    assert (s.max_in_flight, s.timeout_cap_s) == (3, 2.5)


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("ES_MAX_IN_FLIGHT", "many", "ES_MAX_IN_FLIGHT='many' is not valid"),
        ("ES_TIMEOUT_CAP_S", "-1", "expected a number > 0"),
        ("ES_ALLOW_OPEN", "perhaps", "expected true/false"),
        ("ES_LOG_FORMAT", "xml", "expected one of json, text"),
    ],
)
def test_bad_value_names_the_variable(name: str, value: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected) as info:
        Settings.from_env(environ={name: value})
    assert name in str(info.value)


def test_the_call_cap_must_stay_below_gunicorns_worker_timeout() -> None:
    with pytest.raises(ConfigError, match="ES_TIMEOUT_CAP_S=60 must be below GUNICORN_TIMEOUT=60"):
        Settings.from_env(environ={"ES_TIMEOUT_CAP_S": "60"})
    ok = Settings.from_env(environ={"ES_TIMEOUT_CAP_S": "60", "GUNICORN_TIMEOUT": "90"})
    assert ok.timeout_cap_s == 60.0


def test_the_backoff_base_must_not_exceed_its_cap() -> None:
    with pytest.raises(ConfigError, match="ES_BACKOFF_BASE_S=5 is above ES_BACKOFF_MAX_S=2"):
        Settings.from_env(environ={"ES_BACKOFF_BASE_S": "5", "ES_BACKOFF_MAX_S": "2"})


def test_each_role_reads_only_its_own_settings() -> None:
    from executor_service.dispatcher.config import ClientSettings, DispatcherSettings
    from executor_service.executor.config import ExecutorSettings

    executor = set(ExecutorSettings.env_names())
    dispatcher = set(DispatcherSettings.env_names())
    client = set(ClientSettings.env_names())
    assert "ES_CATALOG" in executor and "ES_CATALOG" not in dispatcher
    assert "ES_DATABASE_URL" in dispatcher and "ES_DATABASE_URL" not in executor
    assert client == {"ES_DISPATCHER_URL", "ES_DISPATCHER_KEY"}
    assert set(Settings.env_names()) == executor | dispatcher | client


def test_runtime_configs_take_their_defaults_from_the_settings() -> None:
    from executor_service.dispatcher.jobs import JobLimits
    from executor_service.dispatcher.rules import DEFAULT_RETRY_HANDOFF_S
    from executor_service.dispatcher.scheduler import BackoffPolicy
    from executor_service.dispatcher.worker import WorkerConfig

    s = Settings.from_env(environ={})
    assert WorkerConfig() == WorkerConfig.from_settings(s)
    assert BackoffPolicy() == BackoffPolicy.from_settings(s)
    assert s.retry_handoff_s == DEFAULT_RETRY_HANDOFF_S
    assert JobLimits.from_settings(s) == JobLimits(s.max_job_questions, s.max_job_executions)
