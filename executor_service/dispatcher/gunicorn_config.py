"""Gunicorn settings for the dispatcher's HTTP API (``executor-service dispatcher api``).

Separate from the executor's: the API is light (store reads and writes), so
one worker with a few threads is enough, and the metrics directory belongs to
whoever runs the API and the region workers (``executor-service dispatcher`` makes
one and gives it to both processes);
it must not be wiped when gunicorn starts, as the executor's config does.

    HOST (127.0.0.1), PORT (8100), DISPATCHER_WORKERS (1),
    DISPATCHER_WORKER_CLASS (gevent | gthread; default gevent), DISPATCHER_THREADS (4, gthread),
    GUNICORN_TIMEOUT (60), GUNICORN_GRACEFUL_TIMEOUT (30), GUNICORN_ACCESSLOG ("" off),
    GUNICORN_CONTROL_SOCKET (none: no control socket).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from executor_service.gunicorn_common import GUNICORN_TIMEOUT_DEFAULT
from executor_service.gunicorn_common import env_int as _int

bind = [f"{os.environ.get('HOST', '127.0.0.1')}:{_int('PORT', 8100)}"]
workers = _int("DISPATCHER_WORKERS", 1)
threads = _int("DISPATCHER_THREADS", 4)
# gevent: an idle socket or a slowloris client holds a greenlet, not one of the few
# threads (under gthread 4 slowloris clients froze the API). The store calls are
# short; psycopg waits cooperatively under gevent, SQLite's are local disk reads.
worker_class = os.environ.get("DISPATCHER_WORKER_CLASS", "").strip() or "gevent"
if worker_class not in {"gthread", "gevent"}:
    sys.exit(f"DISPATCHER_WORKER_CLASS={worker_class!r}: expected gthread or gevent")
worker_connections = 1000
timeout = _int("GUNICORN_TIMEOUT", GUNICORN_TIMEOUT_DEFAULT)
graceful_timeout = _int("GUNICORN_GRACEFUL_TIMEOUT", 30)
# Under gevent a stopping worker waits for its idle kept-alive connections to time out:
# 5 s made the API outlive the 5 s margin `dispatcher run` gives it after SIGTERM (it
# was killed and the command exited 1). Clients (the CLI, the page) poll every second
# or more, so 2 s keeps their connection warm.
keepalive = 2
accesslog = os.environ.get("GUNICORN_ACCESSLOG", "") or None
errorlog = "-"
loglevel = os.environ.get("GUNICORN_LOGLEVEL", "warning")
preload_app = False
# No control socket shared by every gunicorn on the host (see the executor's config).
if os.environ.get("GUNICORN_CONTROL_SOCKET"):
    control_socket = os.environ["GUNICORN_CONTROL_SOCKET"]
control_socket_disable = not os.environ.get("GUNICORN_CONTROL_SOCKET")


def on_starting(server: Any) -> None:
    """Refuse an open (keyless) API on a non-loopback address unless asked for."""
    from executor_service.auth import KeyRing, check_open_bind
    from executor_service.config import ConfigError
    from executor_service.dispatcher.config import DispatcherSettings

    try:
        settings = DispatcherSettings.from_env()
        check_open_bind(server.cfg.bind, KeyRing.from_settings(settings), settings.allow_open)
    except ConfigError as exc:
        server.log.error("configuration error: %s", exc)
        sys.exit(1)


def child_exit(server: Any, worker: Any) -> None:
    """A dead worker's live gauges must stop counting."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)
