"""Every role's settings in one class: ``config.Settings`` (lazily imported from there).

For what needs them all at once: the README check (every variable documented), tests,
and callers that build one object for both roles. Each role reads its own class.
"""

from __future__ import annotations

from dataclasses import dataclass

from .dispatcher.config import ClientSettings, DispatcherSettings
from .executor.config import ExecutorSettings


@dataclass(frozen=True)
class Settings(ExecutorSettings, DispatcherSettings, ClientSettings):
    """Executor, dispatcher and client settings together."""
