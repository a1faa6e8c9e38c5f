"""The regions file: which executors the dispatcher fans out to.

A TOML file (``ES_REGIONS_FILE``) with one table per region::

    [regions.us-east]
    url = "https://executor-us-east.example.com"
    concurrency = 8                 # calls in flight at once, across all dispatchers
    models = ["smollm2-135m", "gpt-4o-mini"]
    api_key_env = "ES_KEY_US_EAST"  # name of the env var holding that executor's key
    timeout_s = 60                  # per call, sent to the executor as timeout_s
    # optional: USD per million tokens, for the cost figures of GET /jobs/<id>/compare
    prices = { "gpt-4o-mini" = { prompt = 0.15, completion = 0.60 } }

    [regions.us-east.limits."gpt-4o-mini"]   # optional, per model: the provider's limits
    rpm = 300                       # requests per window, for all dispatchers together
    tpm = 150000                    # tokens (prompt chars / 4 + max_tokens) per window
    concurrency = 4                 # this model's calls in flight (default: the region's)
    window_s = 60                   # the window of rpm and tpm (default 60: per minute)

It is read and checked once at start; a mistake stops the process with a
message naming the file, the region and the key, instead of surfacing as
failed calls later.
"""

from __future__ import annotations

import logging
import os
import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..config import ConfigError
from .pacing import Budget
from .store.base import RegionSpec

logger = logging.getLogger(__name__)

# Region names appear in URLs, metric labels and CSV headers: keep them plain.
REGION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Well above what one executor replica set serves (hundreds with gevent);
# a typo like 10000 is refused instead of opening that many threads.
MAX_CONCURRENCY = 1024
# The executor caps one call at 50 s by default; longer waits are almost always a typo.
DEFAULT_TIMEOUT_S = 60.0
MAX_TIMEOUT_S = 3600.0
KNOWN_KEYS = frozenset(
    {"url", "concurrency", "models", "api_key_env", "timeout_s", "limits", "prices"}
)
LIMIT_KEYS = frozenset({"rpm", "tpm", "concurrency", "window_s"})
# A window longer than a day is a typo (rpm = per minute is the common case).
MAX_WINDOW_S = 86400.0
PRICE_KEYS = frozenset({"prompt", "completion"})


@dataclass(frozen=True)
class Region:
    """One region: its executor's URL, how many calls it takes at once, what it serves."""

    name: str
    url: str
    concurrency: int
    models: tuple[str, ...]
    api_key_env: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    # model -> its limits here (rpm/tpm budgets, concurrency); a model absent is unlimited
    limits: Mapping[str, Budget] = field(default_factory=dict)
    # model -> {"prompt": USD per million prompt tokens, "completion": ...}
    prices: Mapping[str, Mapping[str, float]] = field(default_factory=dict)

    def budget(self, model: str) -> Budget:
        """The model's limits in this region (an empty Budget: none)."""
        return self.limits.get(model, Budget())

    def model_concurrency(self, model: str) -> int:
        """The most calls of ``model`` in flight here (adaptive concurrency's ceiling)."""
        cap = self.budget(model).concurrency
        return self.concurrency if cap is None else min(cap, self.concurrency)

    def spec(self) -> RegionSpec:
        """What the store needs to claim for this region."""
        return RegionSpec(self.name, self.concurrency, frozenset(self.models))

    def serves(self, model: str) -> bool:
        return model in self.models

    def api_key(self, environ: Mapping[str, str] | None = None) -> str | None:
        """The executor's API key from the named environment variable (None if no key)."""
        if self.api_key_env is None:
            return None
        env = os.environ if environ is None else environ
        key = env.get(self.api_key_env, "").strip()
        if not key:
            raise ConfigError(
                f"region {self.name!r}: api_key_env names {self.api_key_env}, which is not set"
            )
        return key


@dataclass(frozen=True)
class Regions:
    """Every region, in file order."""

    by_name: dict[str, Region]

    def __iter__(self) -> Iterator[Region]:
        return iter(self.by_name.values())

    def __len__(self) -> int:
        return len(self.by_name)

    def __contains__(self, name: object) -> bool:
        return name in self.by_name

    def __getitem__(self, name: str) -> Region:
        return self.by_name[name]

    def names(self) -> list[str]:
        return list(self.by_name)

    def models(self) -> list[str]:
        """Every model some region serves, sorted."""
        return sorted({m for r in self for m in r.models})

    def serving(self, model: str) -> list[str]:
        """The regions that serve ``model``, in file order."""
        return [r.name for r in self if r.serves(model)]

    def specs(self) -> list[RegionSpec]:
        return [r.spec() for r in self]

    def prices(self) -> dict[str, Mapping[str, Mapping[str, float]]]:
        """region -> model -> prices per million tokens, where the file gives them."""
        return {r.name: r.prices for r in self if r.prices}

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str = "regions file") -> Regions:
        """Check the parsed TOML and build the regions; ConfigError names what is wrong."""
        unknown_top = set(data) - {"regions"}
        if unknown_top:
            raise ConfigError(f"{source}: unknown top-level keys {sorted(unknown_top)}")
        tables = data.get("regions")
        if not isinstance(tables, dict) or not tables:
            raise ConfigError(f"{source}: needs at least one [regions.NAME] table")
        regions: dict[str, Region] = {}
        for name, table in tables.items():
            regions[name] = _region(name, table, source)
        return cls(regions)

    @classmethod
    def load(cls, path: Path | None) -> Regions:
        """Read and check the regions file at ``path`` (``ES_REGIONS_FILE``)."""
        if path is None:
            raise ConfigError(
                "ES_REGIONS_FILE is not set: the dispatcher needs a regions file "
                "([regions.NAME] tables with url, concurrency and models)"
            )
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"ES_REGIONS_FILE={path}: cannot read: {exc}") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        return cls.from_mapping(data, str(path))


def _region(name: str, table: Any, source: str) -> Region:
    where = f"{source}: [regions.{name}]"
    if not REGION_NAME.match(name):
        raise ConfigError(
            f"{source}: region name {name!r} must be letters, digits, '-' or '_' (at most 64)"
        )
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table")
    unknown = set(table) - KNOWN_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; expected {sorted(KNOWN_KEYS)}")

    url = table.get("url")
    if not isinstance(url, str) or not url:
        raise ConfigError(f"{where}: url is required (the executor's base URL)")
    parts = urlsplit(url)
    if parts.scheme not in {"http", "https"} or not parts.netloc:
        raise ConfigError(f"{where}: url {url!r} must be an http:// or https:// URL")

    concurrency = table.get("concurrency")
    if (
        isinstance(concurrency, bool)
        or not isinstance(concurrency, int)
        or not 1 <= concurrency <= MAX_CONCURRENCY
    ):
        raise ConfigError(
            f"{where}: concurrency must be an integer 1..{MAX_CONCURRENCY}, not {concurrency!r}"
        )

    models = table.get("models")
    if (
        not isinstance(models, list)
        or not models
        or not all(isinstance(m, str) and m for m in models)
    ):
        raise ConfigError(f"{where}: models must be a non-empty list of model names")
    if len(set(models)) != len(models):
        raise ConfigError(f"{where}: models lists a model twice")

    api_key_env = table.get("api_key_env")
    if api_key_env is not None and (
        not isinstance(api_key_env, str) or not ENV_NAME.match(api_key_env)
    ):
        raise ConfigError(
            f"{where}: api_key_env must be the name of an environment variable, not {api_key_env!r}"
        )

    timeout_s = table.get("timeout_s", DEFAULT_TIMEOUT_S)
    if (
        isinstance(timeout_s, bool)
        or not isinstance(timeout_s, int | float)
        or not 0 < timeout_s <= MAX_TIMEOUT_S
    ):
        raise ConfigError(f"{where}: timeout_s must be a number in (0, {MAX_TIMEOUT_S:g}]")

    limits = _limits(table.get("limits", {}), models, where)
    prices = _prices(table.get("prices", {}), models, where)

    return Region(
        prices=prices,
        name=name,
        url=url.rstrip("/"),
        concurrency=concurrency,
        models=tuple(models),
        api_key_env=api_key_env,
        timeout_s=float(timeout_s),
        limits=limits,
    )


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _limits(table: Any, models: list[str], where: str) -> dict[str, Budget]:
    """``[regions.NAME.limits.MODEL]`` tables: rpm, tpm, concurrency, window_s."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: limits must be a table of [limits.MODEL] tables")
    out: dict[str, Budget] = {}
    for model, entry in table.items():
        at = f"{where}: limits.{model}"
        if model not in models:
            raise ConfigError(f"{at}: {model!r} is not in this region's models")
        if not isinstance(entry, dict):
            raise ConfigError(f"{at} must be a table (rpm, tpm, concurrency, window_s)")
        unknown = set(entry) - LIMIT_KEYS
        if unknown:
            raise ConfigError(
                f"{at}: unknown keys {sorted(unknown)}; expected {sorted(LIMIT_KEYS)}"
            )
        for key in ("rpm", "tpm", "concurrency"):
            if key in entry and not _positive_int(entry[key]):
                raise ConfigError(f"{at}: {key} must be an integer >= 1, not {entry[key]!r}")
        window = entry.get("window_s", 60.0)
        if (
            isinstance(window, bool)
            or not isinstance(window, int | float)
            or not 0 < window <= MAX_WINDOW_S
        ):
            raise ConfigError(f"{at}: window_s must be a number in (0, {MAX_WINDOW_S:g}]")
        out[model] = Budget(
            rpm=entry.get("rpm"),
            tpm=entry.get("tpm"),
            window_s=float(window),
            concurrency=entry.get("concurrency"),
        )
    return out


def _prices(table: Any, models: list[str], where: str) -> dict[str, dict[str, float]]:
    """The region's ``prices`` table: model -> {prompt, completion} in USD per million."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: prices must be a table of model = {{ prompt, completion }}")
    out: dict[str, dict[str, float]] = {}
    for model, price in table.items():
        if model not in models:
            raise ConfigError(f"{where}: prices names {model!r}, which the region does not serve")
        if not isinstance(price, dict) or not price or set(price) - PRICE_KEYS:
            raise ConfigError(
                f"{where}: prices.{model} must be {{ prompt = N, completion = N }} "
                "(USD per million tokens)"
            )
        for key, value in price.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ConfigError(f"{where}: prices.{model}.{key} must be a number >= 0")
        out[model] = {k: float(v) for k, v in price.items()}
    return out
