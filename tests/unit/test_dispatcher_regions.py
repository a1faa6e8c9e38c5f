"""The regions file: a good file loads; each kind of mistake is refused with a message naming it."""

from __future__ import annotations

from pathlib import Path

import pytest

from executor_service.config import ConfigError
from executor_service.dispatcher.regions import Regions

GOOD = """
[regions.us-east]
url = "http://10.0.0.1:8000/"
concurrency = 4
models = ["a", "b"]
api_key_env = "KEY_US"
timeout_s = 20

[regions.eu-west]
url = "https://eu.example.com"
concurrency = 2
models = ["a"]
"""


def test_a_good_file_loads_in_order_with_defaults(tmp_path: Path) -> None:
    path = tmp_path / "regions.toml"
    path.write_text(GOOD)
    regions = Regions.load(path)
    assert regions.names() == ["us-east", "eu-west"]
    us = regions["us-east"]
    assert us.url == "http://10.0.0.1:8000"  # trailing slash dropped
    assert (us.concurrency, us.models, us.timeout_s) == (4, ("a", "b"), 20.0)
    assert regions["eu-west"].timeout_s == 60.0 and regions["eu-west"].api_key_env is None
    assert regions.serving("a") == ["us-east", "eu-west"]
    assert regions.serving("b") == ["us-east"]
    assert regions.models() == ["a", "b"]
    spec = us.spec()
    assert spec.name == "us-east" and spec.concurrency == 4 and spec.models == {"a", "b"}


def test_prices_per_million_tokens_are_read_per_region_and_model(tmp_path: Path) -> None:
    path = tmp_path / "regions.toml"
    path.write_text(GOOD + "prices = { a = { prompt = 0.15, completion = 0.6 } }\n")
    regions = Regions.load(path)
    assert regions.prices() == {"eu-west": {"a": {"prompt": 0.15, "completion": 0.6}}}
    assert regions["us-east"].prices == {}


def test_api_key_comes_from_the_named_variable(tmp_path: Path) -> None:
    path = tmp_path / "regions.toml"
    path.write_text(GOOD)
    us = Regions.load(path)["us-east"]
    assert us.api_key({"KEY_US": " secret "}) == "secret"
    with pytest.raises(ConfigError, match="KEY_US, which is not set"):
        us.api_key({})
    assert Regions.load(path)["eu-west"].api_key({}) is None


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('concurrency = 1\nmodels = ["a"]', "url is required"),
        ('url = "ftp://x"\nconcurrency = 1\nmodels = ["a"]', "must be an http"),
        ('url = "http://x"\nconcurrency = 0\nmodels = ["a"]', "concurrency must be an integer"),
        ('url = "http://x"\nconcurrency = "2"\nmodels = ["a"]', "concurrency must be an integer"),
        ('url = "http://x"\nconcurrency = true\nmodels = ["a"]', "concurrency must be an integer"),
        ('url = "http://x"\nconcurrency = 1\nmodels = []', "models must be a non-empty list"),
        ('url = "http://x"\nconcurrency = 1\nmodels = ["a", "a"]', "lists a model twice"),
        ('url = "http://x"\nconcurrency = 1\nmodels = ["a"]\nap_key_env = "K"', "unknown keys"),
        ('url = "http://x"\nconcurrency = 1\nmodels = ["a"]\napi_key_env = "1-bad"', "api_key_env"),
        ('url = "http://x"\nconcurrency = 1\nmodels = ["a"]\ntimeout_s = -1', "timeout_s"),
        (
            'url = "http://x"\nconcurrency = 1\nmodels = ["a"]\nprices = { b = { prompt = 1 } }',
            "does not serve",
        ),
        (
            'url = "http://x"\nconcurrency = 1\nmodels = ["a"]\nprices = { a = { input = 1 } }',
            "prompt = N, completion = N",
        ),
        (
            'url = "http://x"\nconcurrency = 1\nmodels = ["a"]\nprices = { a = { prompt = -1 } }',
            "number >= 0",
        ),
    ],
)
def test_mistakes_name_the_region_and_key(tmp_path: Path, table: str, message: str) -> None:
    path = tmp_path / "regions.toml"
    path.write_text(f"[regions.r1]\n{table}\n")
    with pytest.raises(ConfigError, match=message) as info:
        Regions.load(path)
    assert "[regions.r1]" in str(info.value)


def test_file_level_mistakes(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="ES_REGIONS_FILE is not set"):
        Regions.load(None)
    with pytest.raises(ConfigError, match="cannot read"):
        Regions.load(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[regions.x\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        Regions.load(bad)
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    with pytest.raises(ConfigError, match="at least one"):
        Regions.load(empty)
    with pytest.raises(ConfigError, match="region name"):
        Regions.from_mapping(
            {"regions": {"bad name": {"url": "http://x", "concurrency": 1, "models": ["a"]}}}
        )


LIMITED = """
[regions.r1]
url = "http://x"
concurrency = 8
models = ["a", "b", "c"]

[regions.r1.limits.a]
rpm = 300
tpm = 150000

[regions.r1.limits.b]
concurrency = 20
window_s = 5
rpm = 10
"""


def test_per_model_limits_load(tmp_path: Path) -> None:
    path = tmp_path / "regions.toml"
    path.write_text(LIMITED)
    r1 = Regions.load(path)["r1"]
    a, b, c = r1.budget("a"), r1.budget("b"), r1.budget("c")
    assert (a.rpm, a.tpm, a.window_s, a.concurrency) == (300, 150000, 60.0, None)
    assert (b.rpm, b.tpm, b.window_s) == (10, None, 5.0)
    assert not c.limited
    # a model's concurrency never exceeds its region's
    assert (r1.model_concurrency("a"), r1.model_concurrency("b")) == (8, 8)


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        ("[regions.r1.limits.z]\nrpm = 1", "not in this region's models"),
        ("[regions.r1.limits.a]\nrpm = 0", "rpm must be an integer"),
        ("[regions.r1.limits.a]\ntpm = 1.5", "tpm must be an integer"),
        ("[regions.r1.limits.a]\nrpn = 5", "unknown keys"),
        ("[regions.r1.limits.a]\nwindow_s = 0", "window_s"),
        ("[regions.r1]\nlimits = 3", "limits must be a table"),
    ],
)
def test_limit_mistakes_are_refused(tmp_path: Path, limits: str, message: str) -> None:
    base = '[regions.r1]\nurl = "http://x"\nconcurrency = 1\nmodels = ["a"]\n'
    if limits.startswith("[regions.r1]\n"):
        text = base + limits.removeprefix("[regions.r1]\n")
    else:
        text = base + limits
    path = tmp_path / "regions.toml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError, match=message):
        Regions.load(path)
