"""What both gunicorn configs (``executor/gunicorn_config.py``, ``dispatcher/gunicorn_config.py``)
share: reading an integer from the environment, and the worker timeout's default.

Imports nothing of the package but this module: a gunicorn config runs in the master
before PROMETHEUS_MULTIPROC_DIR is set, and importing prometheus_client there would
make every forked worker inherit the wrong storage. (The package's ``__init__`` is
light for the same reason.)
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping

# gunicorn kills a worker silent for this long; the executor's call cap stays below it.
GUNICORN_TIMEOUT_DEFAULT = 60


def _exit(message: str) -> Exception:
    sys.exit(message)


def env_int(
    name: str,
    default: int,
    environ: Mapping[str, str] | None = None,
    fail: Callable[[str], Exception] = _exit,
) -> int:
    """The integer in variable ``name`` (blank or unset: ``default``). A bad value ends
    the process with a message naming the variable (or raises ``fail(message)``)."""
    raw = (os.environ if environ is None else environ).get(name, "")
    try:
        return int(raw) if raw.strip() else default
    except ValueError:
        raise fail(f"{name}={raw!r} is not an integer") from None
