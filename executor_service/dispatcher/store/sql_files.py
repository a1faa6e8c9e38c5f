"""Loading the SQL shipped in the package: versioned migrations (``sql/<dialect>/NNNN_*.sql``)
and named queries (``sql/queries_<dialect>.sql``, blocks that each start with a
``-- name: <name>`` line, as procrastinate keeps its SQL).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources


@dataclass(frozen=True)
class Migration:
    """One versioned SQL file: ``NNNN_name.sql``."""

    version: int
    name: str
    sql: str


def load_migrations(dialect: str) -> list[Migration]:
    """The migrations shipped in ``sql/<dialect>/``, in version order."""
    folder = resources.files("executor_service.dispatcher.store").joinpath("sql", dialect)
    found: list[Migration] = []
    for entry in folder.iterdir():
        if not entry.name.endswith(".sql"):
            continue
        prefix, _, rest = entry.name.partition("_")
        if not prefix.isdigit():
            raise ValueError(f"migration file {entry.name!r} must start with a version number")
        found.append(Migration(int(prefix), rest.removesuffix(".sql"), entry.read_text("utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise ValueError(f"duplicate migration versions in sql/{dialect}: {versions}")
    return found


def load_queries(dialect: str) -> dict[str, str]:
    """The named queries of ``sql/queries_<dialect>.sql``: blocks that each start
    with a ``-- name: <name>`` line, as procrastinate keeps its SQL."""
    text = (
        resources.files("executor_service.dispatcher.store")
        .joinpath("sql", f"queries_{dialect}.sql")
        .read_text("utf-8")
    )
    queries: dict[str, str] = {}
    name: str | None = None
    lines: list[str] = []
    for line in [*text.splitlines(), "-- name: <end>"]:
        if line.startswith("-- name:"):
            if name is not None:
                queries[name] = "\n".join(lines).strip().removesuffix(";")
            name, lines = line.removeprefix("-- name:").strip(), []
        elif name is not None:
            lines.append(line)
    return queries
