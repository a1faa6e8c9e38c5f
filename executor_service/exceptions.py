"""The package's one exception base. Every error executor-service raises on purpose derives
from :class:`ExecutorServiceError`, so a caller can catch "anything this service meant to
raise" in one clause and let a bug (any other exception) crash loudly.

    ExecutorServiceError
      errors.APIError                     an HTTP error with a code (every JSON error body)
      config.ConfigError                  a setting we cannot use (also a ValueError)
      dispatcher.store.base.StoreError    the store failed (driver errors wrapped once)
      executor.providers.base.ProviderFailure / ProviderTimeout   a model call failed
      dispatcher.api_client.CLIError      a command failed in a way the user can act on

As in procrastinate, a class's docstring is its default message.
"""

from __future__ import annotations


class ExecutorServiceError(Exception):
    """executor-service failed."""

    def __init__(self, message: str | None = None, *args: object) -> None:
        super().__init__(message or (type(self).__doc__ or "").strip(), *args)
