"""Helpers shared by the tests: free ports, waiting on a condition, real gunicorn servers."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import requests

REPO = Path(__file__).resolve().parents[1]
GUNICORN_CONFIG = "python:executor_service.executor.gunicorn_config"
EXECUTOR_APP = "executor_service:create_app()"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(
    predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05, what: str = ""
) -> Any:
    """Poll ``predicate`` until it returns a truthy value; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except Exception as exc:  # the condition may raise while a server starts
            last_exc = exc
        else:
            if value:
                return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what or predicate}: {last_exc}")


def write_catalog(path: Path, models: Mapping[str, Mapping[str, Any]]) -> Path:
    """Write a catalog TOML with the given model tables."""
    lines: list[str] = []
    for name, table in models.items():
        lines.append(f'[models."{name}"]')
        for key, value in table.items():
            if isinstance(value, str):
                lines.append(f'{key} = "{value}"')
            elif isinstance(value, bool):
                lines.append(f"{key} = {'true' if value else 'false'}")
            else:
                lines.append(f"{key} = {value}")
        lines.append("")
    path.write_text("\n".join(lines))
    return path


class Gunicorn:
    """A real gunicorn serving an app on a free loopback port, started and stopped by tests."""

    def __init__(
        self,
        tmp: Path,
        env: Mapping[str, str] | None = None,
        app: str = EXECUTOR_APP,
        startup_timeout: float = 60.0,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.tmp = tmp
        self.app = app
        self.startup_timeout = startup_timeout
        metrics_dir = tmp / f"metrics-{self.port}"
        metrics_dir.mkdir(parents=True, exist_ok=True)
        self.env = {
            **os.environ,
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
            "GUNICORN_ACCESSLOG": "",
            "ES_LOG_LEVEL": "warning",
            "ES_REGION": "test-region",
            **(env or {}),
        }
        self.log_path = tmp / f"gunicorn-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None

    def start(self) -> Gunicorn:
        self._log_file = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", GUNICORN_CONFIG, self.app],
            cwd=REPO,
            env=self.env,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_until(self._ready, self.startup_timeout, what=f"gunicorn on {self.url}")
        except TimeoutError:
            self.stop()
            raise TimeoutError(f"gunicorn did not start; log:\n{self.log()}") from None
        return self

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"gunicorn exited with {self.proc.returncode}:\n{self.log()}")
        return requests.get(self.url + "/ready", timeout=2).status_code == 200

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def worker_pids(self) -> list[int]:
        """PIDs of the gunicorn workers (children of the master)."""
        assert self.proc is not None
        out = subprocess.run(
            ["ps", "-o", "pid=", "--ppid", str(self.proc.pid)], capture_output=True, text=True
        ).stdout
        return [int(p) for p in out.split()]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        try:
            if self.proc is None or self.proc.poll() is not None:
                return None if self.proc is None else self.proc.returncode
            self.proc.send_signal(sig)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return self.proc.wait(10)
        finally:
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None

    def __enter__(self) -> Gunicorn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class HostileClients:
    """Idle and slowloris connections held open against a server (target E4).

    ``idle`` sockets connect and send nothing; ``slowloris`` ones send a request line
    and then one header byte every ``drip_s`` seconds, never finishing the headers.
    Used as a context manager; a background thread keeps the slow clients dripping.
    """

    def __init__(self, port: int, idle: int = 64, slowloris: int = 16, drip_s: float = 1.0) -> None:
        self.port, self.n_idle, self.n_slow, self.drip_s = port, idle, slowloris, drip_s
        self.sockets: list[socket.socket] = []
        self._slow: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drip, daemon=True)

    def _connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        self.sockets.append(sock)
        return sock

    def __enter__(self) -> HostileClients:
        for _ in range(self.n_idle):
            self._connect()
        for _ in range(self.n_slow):
            sock = self._connect()
            sock.sendall(b"POST /execute HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            self._slow.append(sock)
        self._thread.start()
        return self

    def _drip(self) -> None:
        while not self._stop.wait(self.drip_s):
            for sock in self._slow:
                with contextlib.suppress(OSError):
                    sock.send(b"X")

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.close()


class CuttableProxy:
    """A TCP proxy on 127.0.0.1 in front of ``target`` (host, port) that a test can cut:
    ``cut()`` drops every connection and refuses new ones (as a database that went
    away does), ``restore()`` listens again on the same port."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self._accepting: threading.Thread | None = None

    def start(self) -> CuttableProxy:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        self._accepting = threading.Thread(target=self._accept, args=(listener,), daemon=True)
        self._accepting.start()
        return self

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        if self._listener is not None:
            # shutdown first: close() alone leaves a thread blocked in accept() accepting
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
        with self._lock:
            conns, self._conns = self._conns, []
        for sock in conns:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()

    def restore(self) -> None:
        self.start()

    def url(self, database_url: str) -> str:
        """``database_url`` pointing at this proxy instead of its own host and port."""
        from urllib.parse import urlsplit

        parts = urlsplit(database_url)
        user = f"{parts.username}@" if parts.username else ""
        return parts._replace(netloc=f"{user}127.0.0.1:{self.port}").geturl()

    def __enter__(self) -> CuttableProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cut()
