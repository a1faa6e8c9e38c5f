"""Gunicorn settings for the executor (loaded by the top-level gunicorn.conf.py, the
``executor_service.gunicorn_config`` shim and ``executor-service serve``); every value can
be overridden from the environment.

    PORT (8000), HOST (0.0.0.0), WEB_CONCURRENCY (workers, 4),
    GUNICORN_THREADS (2: model calls one worker runs at once; gthread: its threads),
    GUNICORN_WORKER_CLASS (gevent | gthread; default gevent),
    GUNICORN_WORKER_CONNECTIONS (gevent: 1000; gthread: the thread count),
    GUNICORN_TIMEOUT (60), GUNICORN_GRACEFUL_TIMEOUT (30),
    GUNICORN_KEEPALIVE (5; 0 under gthread when a worker accepts only its threads),
    GUNICORN_MAX_REQUESTS (1000), GUNICORN_MAX_REQUESTS_JITTER (100), GUNICORN_BACKLOG (2048),
    GUNICORN_ACCESSLOG ("-" = stdout; "" turns it off), GUNICORN_LOGLEVEL (info),
    GUNICORN_CONTROL_SOCKET (none: no control socket).

Server settings only: the app reads its own ``ES_*`` settings in create_app().
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
from typing import Any

# Only the light helper: importing the app here would import prometheus_client in the
# master before PROMETHEUS_MULTIPROC_DIR is set, and every forked worker would inherit it.
from executor_service.gunicorn_common import GUNICORN_TIMEOUT_DEFAULT
from executor_service.gunicorn_common import env_int as _int

bind = [f"{os.environ.get('HOST', '0.0.0.0')}:{_int('PORT', 8000)}"]
workers = _int("WEB_CONCURRENCY", 4)
threads = _int("GUNICORN_THREADS", 2)
# gevent by default: every connection is a greenlet, so idle sockets and slowloris
# clients (one header byte a second) cost a little memory each and never hold what
# a request needs (target E4). Under gthread a connection holds a thread while its
# headers arrive: 8 idle sockets froze the 4 x 2 default for 5-10 s each, 8 slowloris
# clients for minutes. The model call itself runs off the event loop: llama_cpp in
# gevent's native thread pool, the openai provider on gevent-patched sockets.
_explicit_class = os.environ.get("GUNICORN_WORKER_CLASS", "").strip()
worker_class = _explicit_class or "gevent"
if worker_class not in {"gthread", "gevent"}:
    sys.exit(f"GUNICORN_WORKER_CLASS={worker_class!r}: expected gthread or gevent")
# gthread: a worker accepts only the connections it can run now, so a busy worker
# leaves new ones to idle workers instead of queueing them behind its own calls
# (with the default 1000, one worker took 3 calls while three workers idled).
# This turns HTTP keep-alive off under gthread; gevent keeps 1000.
worker_connections = _int(
    "GUNICORN_WORKER_CONNECTIONS", threads if worker_class == "gthread" else 1000
)
timeout = _int("GUNICORN_TIMEOUT", GUNICORN_TIMEOUT_DEFAULT)
graceful_timeout = _int("GUNICORN_GRACEFUL_TIMEOUT", 30)
# gthread keeps idle connections alive only in the connections beyond its threads; with
# none beyond (the default above) keep-alive is off, said as 0 so that gunicorn does not
# warn "No keepalived connections can be handled" at every start.
keepalive = _int(
    "GUNICORN_KEEPALIVE", 0 if worker_class == "gthread" and worker_connections <= threads else 5
)
max_requests = _int("GUNICORN_MAX_REQUESTS", 1000)
max_requests_jitter = _int("GUNICORN_MAX_REQUESTS_JITTER", 100)
backlog = _int("GUNICORN_BACKLOG", 2048)
accesslog = os.environ.get("GUNICORN_ACCESSLOG", "-") or None
errorlog = "-"
loglevel = os.environ.get("GUNICORN_LOGLEVEL", "info")
access_log_format = '%(h)s "%(r)s" %(s)s %(b)s %(M)sms pid=%(p)s request_id=%({x-request-id}o)s'
# Workers import the app after the fork: each gets its own model instance.
preload_app = False
# gunicorn (25.1+) opens a control socket at $HOME/.gunicorn/gunicorn.ctl by default:
# every master on a host would share that one path (the last to start takes it over,
# the first to stop removes it). Off, unless GUNICORN_CONTROL_SOCKET names this
# instance's own path.
if os.environ.get("GUNICORN_CONTROL_SOCKET"):
    control_socket = os.environ["GUNICORN_CONTROL_SOCKET"]
control_socket_disable = not os.environ.get("GUNICORN_CONTROL_SOCKET")

# The admission limit per process (ES_MAX_IN_FLIGHT): model calls one worker runs at
# once, beyond which a call is answered 503 overloaded at once. By default it is the
# thread count under either worker class, so the default replica (4 workers x 2) runs
# 8 calls at once, as the gthread default always did: the scale rule and the dispatcher's
# region concurrency count on it, and a local model gains nothing from more (one
# llama.cpp call per process at a time). GUNICORN_WORKER_CLASS=gevent set explicitly
# asks for the I/O-bound profile (remote providers): 250 calls per worker. With 100
# per worker 4 workers refused some calls at ~350 in flight, the kernel spreading
# connections unevenly (target E2: 400).
GEVENT_MAX_IN_FLIGHT = 250
if not os.environ.get("ES_MAX_IN_FLIGHT", "").strip() or os.environ["ES_MAX_IN_FLIGHT"] == "0":
    os.environ["ES_MAX_IN_FLIGHT"] = str(
        GEVENT_MAX_IN_FLIGHT if _explicit_class == "gevent" else threads
    )
# The limit is the replica's: workers x ES_MAX_IN_FLIGHT lock files in a directory of
# this master, shared by its workers (executor/admission.py says why). Always this
# instance's own: an inherited ES_ADMISSION_DIR belongs to another server.
_ADMISSION_DIR = tempfile.mkdtemp(prefix="executor-admission-")
os.environ["ES_ADMISSION_DIR"] = _ADMISSION_DIR
for _i in range(workers * _int("ES_MAX_IN_FLIGHT", threads)):
    open(os.path.join(_ADMISSION_DIR, f"slot-{_i:05d}"), "w").close()

# Prometheus multiprocess mode: every worker writes its samples to files in
# this directory and /metrics adds them up. It must be set before a worker
# imports prometheus_client, hence here, in the master, at config load.
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="executor-metrics-")
_METRICS_DIR = os.environ["PROMETHEUS_MULTIPROC_DIR"]


def on_starting(server: Any) -> None:
    """Start from empty metric files; refuse an open, non-loopback bind or a catalog that
    cannot be read, with one line naming the variable."""
    if os.path.isdir(_METRICS_DIR):
        for name in os.listdir(_METRICS_DIR):
            os.remove(os.path.join(_METRICS_DIR, name))
    from executor_service.auth import KeyRing, check_open_bind
    from executor_service.config import ConfigError
    from executor_service.executor.catalog import Catalog
    from executor_service.executor.config import ExecutorSettings

    try:
        settings = ExecutorSettings.from_env()
        check_open_bind(server.cfg.bind, KeyRing.from_settings(settings), settings.allow_open)
        # Read the catalog here, once: in the workers a bad one is a traceback per worker
        # and "Worker failed to boot" (the models themselves load in post_worker_init).
        Catalog.load(settings.catalog_path)
    except ConfigError as exc:
        server.log.error("configuration error: %s", exc)
        sys.exit(1)


def post_worker_init(worker: Any) -> None:
    """Load every model now, so a worker is ready before it takes traffic, and mark
    the worker as draining on SIGTERM so /ready turns 503 while in-flight calls finish."""
    app = worker.wsgi
    state = getattr(app, "extensions", {}).get("executor")
    if state is None:
        return
    state.catalog.load_all()
    previous = signal.getsignal(signal.SIGTERM)

    def _drain(signum: int, frame: Any) -> None:
        state.draining = True
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGTERM, _drain)


def child_exit(server: Any, worker: Any) -> None:
    """A dead worker's live gauges must stop counting."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server: Any) -> None:
    shutil.rmtree(_ADMISSION_DIR, ignore_errors=True)
    if _METRICS_DIR.startswith(tempfile.gettempdir()) and "executor-metrics-" in _METRICS_DIR:
        shutil.rmtree(_METRICS_DIR, ignore_errors=True)
