"""The README documents every setting the code reads."""

from __future__ import annotations

import re

from support import REPO

from executor_service.config import Settings


def test_every_setting_is_in_the_readme() -> None:
    readme = (REPO / "README.md").read_text()
    missing = [name for name in Settings().env_names() if f"`{name}`" not in readme]
    assert missing == []


def test_every_gunicorn_variable_is_in_the_readme() -> None:
    readme = (REPO / "README.md").read_text()
    source = (REPO / "executor_service" / "executor" / "gunicorn_config.py").read_text()
    names = set(re.findall(r"_int\(['\"]([A-Z_]+)['\"]", source))
    names |= set(re.findall(r'os\.environ\.get\("([A-Z_]+)"', source))
    assert {"PORT", "WEB_CONCURRENCY", "GUNICORN_THREADS"} <= names
    missing = sorted(n for n in names if n not in readme)
    assert missing == []


def test_every_dispatcher_gunicorn_variable_is_in_the_readme() -> None:
    readme = (REPO / "README.md").read_text()
    source = (REPO / "executor_service" / "dispatcher" / "gunicorn_config.py").read_text()
    names = set(re.findall(r"_int\(['\"]([A-Z_]+)['\"]", source))
    names |= set(re.findall(r'os\.environ\.get\("([A-Z_]+)"', source))
    assert {"DISPATCHER_WORKERS", "DISPATCHER_THREADS"} <= names
    missing = sorted(n for n in names if n not in readme)
    assert missing == []
