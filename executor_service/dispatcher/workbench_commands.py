"""The workbench's client commands, beside ``commands.py`` (submit, status, results):

    jobs [--state S] [--name N] [--limit N] [--all] [--json]   the tenant's jobs, newest first
    cancel JOB                       cancel what has not started
    retry JOB [--region R]... [--model M]... [--include-cancelled]
                                     re-queue dead (and cancelled) executions
    results JOB --format compare     the comparison grid, every answer in full (wrapped)
    results JOB --format compare-csv the same as a wide CSV: one answer column per region

and how they print: the comparison in a terminal marks the words that differ from the
question's first answered region.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from typing import Any

import click

from . import compare, exports
from .api_client import api_from_env


def _verdict(row: Mapping[str, Any]) -> str:
    if row["differs"]:
        alike = "" if row["similarity"] is None else f" ({row['similarity']:.0%} alike)"
        return "DIFFERS" + alike
    if row["exact_match"]:
        return "same"
    return "incomplete"


def print_compare(grid: Mapping[str, Any], console: Any) -> None:
    """Per model a table question x region, every answer in full: rich wraps long text
    in its cell (never cuts it). The words that differ are styled on a terminal and put
    in «» where there is no colour (a pipe, a file)."""
    from rich.table import Table
    from rich.text import Text

    plain = console.color_system is None

    for m in grid["models"]:
        table = Table(
            title=f"{m['model']}: {m['rows_differing']} of {len(m['rows'])} rows differ",
            show_lines=True,
            expand=True,
        )
        table.add_column("question", overflow="fold", ratio=2)
        table.add_column("verdict", overflow="fold")
        for region in m["regions"]:
            table.add_column(region, overflow="fold", ratio=3)
        for row in m["rows"]:
            question = row["question"] + (f"\n(sample {row['sample']})" if row["sample"] else "")
            cells: list[Any] = []
            for region in m["regions"]:
                cell = row["cells"].get(region)
                if cell is not None and cell.get("segments"):
                    text = Text()
                    for seg in cell["segments"]:
                        if not seg["changed"]:
                            text.append(seg["text"])
                        elif plain:
                            words = seg["text"].rstrip()
                            text.append(f"«{words}»" + seg["text"][len(words) :])
                        else:
                            text.append(seg["text"], style="bold reverse")
                    cells.append(text)
                else:
                    cells.append(Text(compare.cell_text(cell)))
            table.add_row(Text(question), _verdict(row), *cells)
        console.print(table)
    usage = grid.get("usage", {}).get("job")
    if usage:
        cost = "" if usage["cost_usd"] is None else f", ${usage['cost_usd']:.4f}"
        console.print(
            f"{usage['executions']} answers: {usage['prompt_tokens']} prompt + "
            f"{usage['completion_tokens']} completion tokens{cost}"
        )


def compare_csv(grid: Mapping[str, Any]) -> str:
    """The comparison as a wide CSV (``compare.wide_rows``)."""
    header, rows = compare.wide_rows(grid)
    return exports.wide_csv(header, rows)


def print_jobs(jobs: list[Mapping[str, Any]], console: Any) -> None:
    from datetime import datetime

    from rich.table import Table

    table = Table(title="jobs, newest first")
    table.add_column("created")
    table.add_column("id", no_wrap=True, min_width=32)  # whole, to copy and paste
    for name in ("name", "tags", "state", "succeeded", "dead", "total"):
        table.add_column(name, overflow="fold")

    for job in jobs:
        p = job["progress"]
        table.add_row(
            datetime.fromtimestamp(job["created_at"]).strftime("%Y-%m-%d %H:%M:%S"),
            job["id"],
            job.get("name") or "",
            ", ".join(job.get("tags") or []),
            job["state"],
            str(p["succeeded"]),
            str(p["dead"]),
            str(p["total"]),
        )
    console.print(table)


@click.command()
@click.option(
    "--state", type=click.Choice(["queued", "running", "finished", "cancelling", "cancelled"])
)
@click.option("--name", help="only jobs whose name contains this (any case)")
@click.option("--limit", type=click.IntRange(1, 200), default=50, show_default=True)
@click.option("--all", "every", is_flag=True, help="every page, not only the newest")
@click.option("--json", "as_json", is_flag=True, help="the API's JSON")
def jobs(state: str | None, name: str | None, limit: int, every: bool, as_json: bool) -> None:
    """The tenant's jobs, newest first."""
    from rich.console import Console

    api = api_from_env()
    page = api.jobs(state=state, name=name, limit=limit)
    found = list(page["jobs"])
    while every and page.get("next_cursor"):
        page = api.jobs(state=state, name=name, limit=limit, cursor=page["next_cursor"])
        found += page["jobs"]
    if as_json:
        click.echo(json.dumps({"jobs": found, "next_cursor": page.get("next_cursor")}, indent=2))
        return
    print_jobs(found, Console())
    if page.get("next_cursor") and not every:
        click.echo("more jobs: --all, or --limit", err=True)


@click.command()
@click.argument("job")
def cancel(job: str) -> None:
    """Cancel a job's executions that have not started (running calls finish)."""
    result = api_from_env().cancel(job)
    click.echo(f"job {result['job_id']}: {result['cancelled']} cancelled ({result['state']})")


@click.command()
@click.argument("job")
@click.option("--region", "regions", multiple=True, help="only executions requested here")
@click.option("--model", "models", multiple=True, help="only this model's executions")
@click.option("--include-cancelled", is_flag=True, help="re-queue cancelled executions too")
def retry(
    job: str, regions: tuple[str, ...], models: tuple[str, ...], include_cancelled: bool
) -> None:
    """Re-queue a job's dead executions in their requested regions, attempts starting over."""
    api = api_from_env()
    result = api.retry(job, list(regions), list(models), include_cancelled)
    click.echo(f"job {result['job_id']}: {result['requeued']} re-queued ({result['state']})")
    click.echo(f"follow it: {api.page_url(job)}")


def print_results(job: str, fmt: str) -> bool:
    """The workbench's formats of ``results`` (compare, compare-csv, jsonl); False if
    ``fmt`` is not one of them."""
    from rich.console import Console

    api = api_from_env()
    if fmt == "compare":
        # a console as wide as the terminal, or 160 columns when piped: wrapped, not cut
        console = Console(width=None if sys.stdout.isatty() else 160)
        print_compare(api.compare(job), console)
    elif fmt == "compare-csv":
        sys.stdout.write(compare_csv(api.compare(job)))
    elif fmt == "jsonl":
        sys.stdout.write(api.results_jsonl(job))
    else:
        return False
    return True
