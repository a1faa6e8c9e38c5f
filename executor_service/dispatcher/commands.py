"""The client commands, talking HTTP to the dispatcher API (``api_client.py``) at
ES_DISPATCHER_URL with the key in ES_DISPATCHER_KEY, and how they show a job:

    submit JOBFILE [--follow] [--idempotency-key K]   a JSON or TOML job; --follow shows a
                        progress bar per region and exits 0 only if every execution succeeded
    submit BATCH.jsonl [--regions eu,us] [--failover none|any] [--follow]
                        an OpenAI Batch API input file, as a batch (openai_commands.py)
    status JOB [--json]                               counts per region and state, progress, ETA
    results JOB [--format table|json|csv|jsonl|compare|compare-csv|openai-batch]
                        (jsonl and compare*: ``workbench_commands.py``, with jobs, cancel, retry;
                        openai-batch, or a batch_... id: ``openai_commands.py``)
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping
from typing import Any

import click

from .api_client import DispatcherAPI, api_from_env, load_job_file

# How often --follow and the demo ask for progress: smooth bars, negligible load.
FOLLOW_POLL_S = 0.5
FINAL = ("succeeded", "dead", "cancelled")
STATE_COLUMNS = ("queued", "leased", "retry_wait", "succeeded", "dead", "cancelled")


def region_progress(job: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """requested region -> (executions in a final state, executions)."""
    out: dict[str, tuple[int, int]] = {}
    for region, states in sorted(job["counts"].items()):
        out[region] = (sum(states.get(s, 0) for s in FINAL), sum(states.values()))
    return out


def waiting_detail(models: Mapping[str, Any]) -> str:
    """Why a region's work waits, per model (the job's ``waiting``): rate limited for how
    long, circuit open since when after which failure, adaptive concurrency k of n, an
    empty budget (the reason is the API's, ``pacing_view.reason``)."""
    parts = []
    for model, view in sorted(models.items()):
        reason = view.get("reason") or ""
        until = view.get("not_before") or view.get("circuit_open_until")
        if until:
            reason += f" until {time.strftime('%H:%M:%S', time.localtime(until))}"
        parts.append(f"{model}: {reason}")
    return "; ".join(parts)


def follow_job(api: DispatcherAPI, job_id: str, console: Any = None) -> dict[str, Any]:
    """Show one live progress bar per region until the job is finished; return the job."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = console or Console()
    job = api.job(job_id)
    with Progress(
        TextColumn("{task.description:<14}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        tasks = {
            region: progress.add_task(region, total=total, detail="")
            for region, (_, total) in region_progress(job).items()
        }
        while True:
            for region, (done, total) in region_progress(job).items():
                states = job["counts"].get(region, {})
                detail = ", ".join(
                    f"{s} {states[s]}" for s in ("leased", "retry_wait", "dead") if states.get(s)
                )
                why = waiting_detail(job.get("waiting", {}).get(region, {}))
                if why:
                    detail = f"{detail}; {why}" if detail else why
                progress.update(tasks[region], completed=done, total=total, detail=detail)
            if job["state"] in ("finished", "cancelled"):
                break
            time.sleep(FOLLOW_POLL_S)
            job = api.job(job_id)
    return job


def print_status(job: Mapping[str, Any], console: Any) -> None:
    from rich import box
    from rich.table import Table

    # No vertical rules, one space each side: eight columns fit 80 characters whole.
    table = Table(
        title=f"job {job['id']} ({job['state']})", box=box.SIMPLE_HEAD, collapse_padding=True
    )
    table.add_column("region", overflow="fold")
    for name in STATE_COLUMNS:
        table.add_column(name, justify="right", overflow="fold")
    table.add_column("total", justify="right", overflow="fold")
    for region, states in sorted(job["counts"].items()):
        table.add_row(
            region,
            *(str(states.get(s, 0)) for s in STATE_COLUMNS),
            str(sum(states.values())),
        )
    console.print(table)
    p = job["progress"]
    eta = job.get("eta_s")
    if not p["in_progress"]:
        eta_text = ""
    elif eta is not None:
        eta_text = f", ETA {eta:.1f} s"
    else:
        eta_text = f", ETA unknown ({job.get('eta_unknown') or 'no rate yet'})"
    console.print(
        f"{p['succeeded']}/{p['total']} succeeded ({p['fraction']:.0%}), {p['dead']} dead, "
        f"{p['cancelled']} cancelled, {p['in_progress']} in progress{eta_text}"
    )


def print_results_table(results: Mapping[str, Any], console: Any) -> None:
    """Every execution, one small table per question and model (region, state, tries,
    answer): the answer gets the width and is shown whole, wrapped; a word too long for
    the column folds onto the next line instead of ending in an ellipsis."""
    from rich.table import Table
    from rich.text import Text

    console.print(Text(f"job {results['job_id']} ({results['state']})", style="bold"))
    groups: dict[tuple[int, str], list[Mapping[str, Any]]] = {}
    for e in results["executions"]:
        groups.setdefault((e["question_index"], e["model"]), []).append(e)
    for (index, model), executions in sorted(groups.items()):
        # Text, never rich markup: a model's brackets are shown as they are.
        title = Text(f"#{index} {executions[0]['question']} ({model})")
        table = Table(title=title, title_justify="left", show_lines=True, expand=True)
        table.add_column("region", overflow="fold")
        table.add_column("state", overflow="fold")
        table.add_column("tries", justify="right")
        table.add_column("answer / error", overflow="fold", ratio=1)
        for e in executions:
            region = e["requested_region"]
            if e["executed_region"] and e["executed_region"] != region:
                region += f" (ran in {e['executed_region']})"
            answer = e["output"]
            if answer is None and e.get("last_error"):
                answer = f"{e['last_error'].get('code')}: {e['last_error'].get('message')}"
            answer = " ".join((answer or "").split())
            if e.get("finish_reason") == "length":
                answer += " [cut at the token limit]"
            cells = (region, e["state"], str(e["attempts"]), answer)
            table.add_row(*(Text(cell) for cell in cells))
        console.print(table)


@click.command()
@click.argument("jobfile")
@click.option("--follow", is_flag=True, help="show live progress per region")
@click.option("--idempotency-key", help="submitting twice gives the same job")
@click.option("--regions", help="batch files: the regions every line runs in (eu,us)")
@click.option("--failover", type=click.Choice(["none", "any"]), help="batch files")
def submit(
    jobfile: str,
    follow: bool,
    idempotency_key: str | None,
    regions: str | None,
    failover: str | None,
) -> None:
    """Submit a job file (JSON or TOML; - reads JSON from stdin), or an OpenAI Batch API
    input file (``.jsonl``) as a batch."""
    from rich.console import Console

    console = Console()
    api = api_from_env()
    if jobfile.endswith(".jsonl"):
        from .openai_commands import submit_batch

        sys.exit(submit_batch(api, jobfile, regions, failover, follow, console))
    job = api.submit(load_job_file(jobfile), idempotency_key)
    console.print(f"job {job['id']}: {job['total']} executions ({job['state']})")
    console.print(f"page: {api.page_url(job['id'])}", soft_wrap=True)
    if not follow:
        return
    job = follow_job(api, job["id"], console)
    print_status(job, console)
    sys.exit(0 if job["states"].get("succeeded", 0) == job["total"] else 1)


@click.command()
@click.argument("job")
@click.option("--json", "as_json", is_flag=True, help="the API's JSON")
def status(job: str, as_json: bool) -> None:
    """A job's progress per region and state."""
    from rich.console import Console

    view = api_from_env().job(job)
    if as_json:
        click.echo(json.dumps(view, indent=2))
    else:
        print_status(view, Console())


@click.command()
@click.argument("job")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "json", "csv", "jsonl", "compare", "compare-csv", "openai-batch"]),
    default="table",
    show_default=True,
)
def results(job: str, fmt: str) -> None:
    """A job's results (compare: the regions' answers side by side, in full; openai-batch:
    OpenAI Batch API output lines, the error lines after the answers; a batch_... id: the
    batch's)."""
    from rich.console import Console

    from .workbench_commands import print_results

    if print_results(job, fmt):
        return
    api = api_from_env()
    if fmt == "openai-batch" or job.startswith("batch_"):
        from .openai_commands import print_batch_results

        print_batch_results(api, job, fmt)
    elif fmt == "csv":
        sys.stdout.write(api.results_csv(job))
    elif fmt == "json":
        click.echo(json.dumps(api.results(job), indent=2))
    else:
        print_results_table(api.results(job), Console())
