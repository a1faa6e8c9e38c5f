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
