"""The ``executor-service`` command.

    executor-service serve        the executor under gunicorn (loopback by default)
    executor-service dispatcher   the dispatcher: HTTP API and one worker per region
    executor-service submit JOBFILE [--follow]
    executor-service status JOB
    executor-service results JOB [--format table|json|csv]

The dispatcher commands live in ``executor_service.dispatcher.cli``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

GUNICORN_CONFIG = "python:executor_service.gunicorn_config"


def _serve(args: argparse.Namespace) -> int:
    """Replace this process with gunicorn, settings passed through the environment."""
    env = dict(os.environ)
    env["HOST"] = args.host
    env["PORT"] = str(args.port)
    for name, value in (
        ("WEB_CONCURRENCY", args.workers),
        ("GUNICORN_THREADS", args.threads),
        ("GUNICORN_WORKER_CLASS", args.worker_class),
    ):
        if value is not None:
            env[name] = str(value)
    argv = [
        sys.executable,
        "-m",
        "gunicorn",
        "-c",
        GUNICORN_CONFIG,
        "executor_service:create_app()",
    ]
    os.execvpe(sys.executable, argv, env)
    return 0  # not reached


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="executor-service", description="Run language-model calls across regions."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the executor under gunicorn")
    serve.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    serve.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    serve.add_argument("--workers", type=int, help="gunicorn workers (WEB_CONCURRENCY, 4)")
    serve.add_argument("--threads", type=int, help="threads per worker (GUNICORN_THREADS, 2)")
    serve.add_argument("--worker-class", choices=["gthread", "gevent"])
    serve.set_defaults(func=_serve)
    from .dispatcher import cli as dispatcher_cli

    dispatcher_cli.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .config import ConfigError

    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"executor-service: configuration error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
