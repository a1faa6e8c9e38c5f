"""The ``executor-service`` command (click).

    executor-service serve [--host H] [--port P] [--workers N] [--threads N] [--worker-class C]
                                    the executor under gunicorn (loopback by default)
    executor-service dispatcher [run|api|worker] ...
                                    the dispatcher's processes (``dispatcher/cli.py``)
    executor-service submit JOBFILE [--follow] | status JOB | results JOB [--format ...]
                                    the dispatcher's client commands (``dispatcher/commands.py``)
    executor-service jobs | cancel JOB | retry JOB   (``dispatcher/workbench_commands.py``)
    executor-service demo [--simulated]
                                    the whole system on one machine (``dispatcher/demo.py``)

A configuration error exits 2 with ``executor-service: configuration error: ...`` (the
message names the variable); an error a user can act on (CLIError: the API refused,
is unreachable, a job file is unreadable) exits 1 with ``executor-service CMD: ...``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

import click

from .config import ConfigError
from .dispatcher import cli as dispatcher_cli
from .dispatcher import commands, demo, workbench_commands
from .dispatcher.api_client import CLIError

GUNICORN_CONFIG = "python:executor_service.executor.gunicorn_config"
EXECUTOR_APP = "executor_service:create_app()"


class Main(click.Group):
    """Turns the package's expected errors into a message on stderr and an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ConfigError as exc:
            click.echo(f"executor-service: configuration error: {exc}", err=True)
            ctx.exit(2)
        except CLIError as exc:
            command = ctx.invoked_subcommand or "executor-service"
            click.echo(f"executor-service {command}: {exc}", err=True)
            ctx.exit(1)


@click.group(cls=Main)
def main() -> None:
    """Run language-model calls across regions."""


@main.command()
@click.option("--host", default=lambda: os.environ.get("HOST", "127.0.0.1"))
@click.option("--port", type=int, default=lambda: int(os.environ.get("PORT", "8000")))
@click.option("--workers", type=int, help="gunicorn workers (WEB_CONCURRENCY, 4)")
@click.option("--threads", type=int, help="threads per worker (GUNICORN_THREADS, 2)")
@click.option("--worker-class", type=click.Choice(["gthread", "gevent"]))
def serve(
    host: str, port: int, workers: int | None, threads: int | None, worker_class: str | None
) -> None:
    """Run the executor under gunicorn (this process becomes gunicorn)."""
    env = {**os.environ, "HOST": host, "PORT": str(port)}
    for name, value in (
        ("WEB_CONCURRENCY", workers),
        ("GUNICORN_THREADS", threads),
        ("GUNICORN_WORKER_CLASS", worker_class),
    ):
        if value is not None:
            env[name] = str(value)
    # Settings and catalog before gunicorn: a mistake is one line here (exit 2), not
    # gunicorn's start-up lines and then the error.
    from .executor.catalog import Catalog
    from .executor.config import ExecutorSettings

    Catalog.load(ExecutorSettings.from_env(env).catalog_path)
    argv = [sys.executable, "-m", "gunicorn", "-c", GUNICORN_CONFIG, EXECUTOR_APP]
    os.execvpe(sys.executable, argv, env)


main.add_command(dispatcher_cli.dispatcher)
main.add_command(commands.submit)
main.add_command(commands.status)
main.add_command(commands.results)
main.add_command(workbench_commands.jobs)
main.add_command(workbench_commands.cancel)
main.add_command(workbench_commands.retry)
main.add_command(demo.demo)


class _ArgvCheck:
    """``parse_args(argv)``: the command line as the commands see it, without running it
    (a Namespace of ``command`` and the command's options), for checks that a command
    line another tool runs (Terraform's, the Dockerfile's) is accepted."""

    def parse_args(self, argv: Sequence[str]) -> argparse.Namespace:
        root = click.Context(main, info_name="executor-service")
        name, *rest = argv
        command = main.get_command(root, name)
        if command is None:
            raise click.UsageError(f"no such command {name!r}", root)
        sub = command.make_context(name, list(rest), parent=root, resilient_parsing=False)
        return argparse.Namespace(command=name, **sub.params)


def build_parser() -> _ArgvCheck:
    """The argparse-era entry point of those checks (tests/deploy), kept for them."""
    return _ArgvCheck()


def run(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` in this process; returns the exit code."""
    try:
        main.main(args=list(argv) if argv is not None else None, standalone_mode=True)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


if __name__ == "__main__":
    main()
