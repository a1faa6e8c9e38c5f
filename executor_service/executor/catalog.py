"""The model catalog: model names mapped to a provider and its settings.

A TOML file (``ES_CATALOG``, else the one shipped in the package) read and
checked once at start. Providers are created lazily, once per worker process,
because gunicorn forks workers after the app module may have been imported
and a loaded llama.cpp model must not be shared across a fork.
"""

from __future__ import annotations

import re
import threading
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ..config import ConfigError
from .providers import Provider, create_provider, provider_kinds

MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")


@dataclass(frozen=True)
class ModelEntry:
    name: str
    provider: str
    description: str = ""
    options: dict[str, Any] = field(default_factory=dict)


class Catalog:
    """Model entries by name, and this process's provider instance for each."""

    def __init__(self, entries: dict[str, ModelEntry]) -> None:
        self.entries = entries
        self._providers: dict[str, Provider] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_mapping(cls, data: dict[str, Any], source: str = "catalog") -> Catalog:
        models = data.get("models")
        if not isinstance(models, dict) or not models:
            raise ConfigError(f"{source}: needs at least one [models.NAME] table")
        entries: dict[str, ModelEntry] = {}
        for name, table in models.items():
            if not MODEL_NAME.match(name):
                raise ConfigError(f"{source}: model name {name!r} is not valid")
            if not isinstance(table, dict):
                raise ConfigError(f"{source}: [models.{name}] must be a table")
            options = dict(table)
            kind = options.pop("provider", None)
            if kind not in provider_kinds():
                raise ConfigError(
                    f"{source}: model {name!r} has provider {kind!r}; "
                    f"expected one of {', '.join(provider_kinds())}"
                )
            description = str(options.pop("description", ""))
            entries[name] = ModelEntry(name, kind, description, options)
        return cls(entries)

    @classmethod
    def load(cls, path: Path | None) -> Catalog:
        """Read the TOML catalog at ``path``, or the default one shipped in the package."""
        if path is None:
            text = resources.files(__package__).joinpath("default_catalog.toml").read_text()
            source = "default catalog"
        else:
            try:
                text = path.read_text()
            except OSError as exc:
                raise ConfigError(
                    f"ES_CATALOG={path}: cannot read it ({exc.strerror or exc}): set ES_CATALOG "
                    "to a model catalog TOML (README: Model catalog), or unset ES_CATALOG to "
                    "serve the packaged catalog"
                ) from None
            source = str(path)
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source}: not valid TOML: {exc}") from None
        return cls.from_mapping(data, source)

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def names(self) -> list[str]:
        return sorted(self.entries)

    def provider(self, name: str) -> Provider:
        """This process's provider for ``name``, created and loaded on first use."""
        provider = self._providers.get(name)
        if provider is not None:
            return provider
        with self._lock:
            provider = self._providers.get(name)
            if provider is None:
                entry = self.entries[name]
                provider = create_provider(entry.provider, entry.name, entry.options)
                provider.load()
                self._providers[name] = provider
        return provider

    def load_all(self) -> None:
        """Create and load every provider now (gunicorn post_fork, so /ready means ready)."""
        for name in self.entries:
            self.provider(name)

    @property
    def loaded(self) -> bool:
        return all(
            name in self._providers and self._providers[name].loaded for name in self.entries
        )

    def close(self) -> None:
        with self._lock:
            for provider in self._providers.values():
                provider.close()
            self._providers.clear()
