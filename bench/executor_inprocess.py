"""E1's parts: the executor's CPU per ``/execute`` call in process, whole and with one part
taken out at a time, against bench/bare_app.py.

Each call goes through the WSGI app with a prebuilt environ (what gunicorn hands the
app: no sockets, no HTTP parsing), so the figures are the apps' own cost, which is
what separates them under gunicorn (bench/executor_overhead.py measures that). Each
variant runs in a fresh interpreter (a part is taken out by replacing it before the
app is built); the figure is the best of ``--rounds`` x ``--calls`` calls of CPU time.

    .venv/bin/python bench/executor_inprocess.py
    .venv/bin/python bench/executor_inprocess.py --variants full,no-metrics --rounds 8
    .venv/bin/python bench/executor_inprocess.py --before /tmp/before   # + "full" of that tree

Variants: full (as deployed: API key, strict JSON and the schema, admission,
multiprocess metrics), no-metrics, no-admission, no-auth, no-validation (the body
parsed by ``json.loads`` and not checked: strict parsing and the schema's ``load``
both out), bare. These are measurements, not product code: the no-* variants lose
what they remove.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BODY = json.dumps(
    {"model": "sim-zero", "prompt": "What is the capital of France?", "max_tokens": 64}
).encode()
VARIANTS = (
    "bare",
    "full",
    "no-metrics",
    "no-admission",
    "no-auth",
    "no-validation",
)


class _NoMetric:
    def labels(self, *_: Any) -> _NoMetric:
        return self

    def inc(self, *_: Any) -> None: ...

    def dec(self, *_: Any) -> None: ...

    def observe(self, *_: Any) -> None: ...


def _environ(auth: bool) -> dict[str, Any]:
    env: dict[str, Any] = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/execute",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8000",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "CONTENT_TYPE": "application/json",
        "CONTENT_LENGTH": str(len(BODY)),
        "wsgi.url_scheme": "http",
        "wsgi.errors": sys.stderr,
        "wsgi.input": io.BytesIO(BODY),
    }
    if auth:
        env["HTTP_AUTHORIZATION"] = "Bearer bench-key"
    return env


def _build(variant: str) -> tuple[Any, bool]:
    """The WSGI app of ``variant`` and whether it needs the API key."""
    if variant == "bare":
        sys.path.insert(0, str(REPO / "bench"))
        import bare_app

        return bare_app.app, False
    if variant == "no-auth":
        os.environ["ES_API_KEYS"] = ""
    import executor_service.executor.admission as admission
    import executor_service.executor.api as api
    import executor_service.executor.calls as calls

    if variant == "no-metrics":
        for name in ("requests_of", "request_seconds_of", "model_seconds_of"):
            setattr(calls, name, lambda *_: _NoMetric())
        for name in ("IN_FLIGHT", "ADMISSION_REJECTIONS"):
            setattr(admission, name, _NoMetric())
    if variant == "no-admission":
        admission.Admission.slot = lambda self: contextlib.nullcontext()  # type: ignore[method-assign,assignment,return-value]
    if variant == "no-validation":
        from flask import request

        api.load_body = lambda _load: {  # type: ignore[assignment]
            **{"max_tokens": 256, "temperature": 0.0, "seed": None, "timeout_s": None},
            **json.loads(request.get_data(cache=True)),
        }
    from executor_service import create_app

    app = create_app()
    return app, os.environ.get("ES_API_KEYS", "") != ""


def measure(variant: str, calls: int, rounds: int) -> float:
    """Best microseconds of CPU per call (run in this interpreter: call it in a child)."""
    app, auth = _build(variant)

    def once() -> None:
        status: list[str] = []
        b"".join(app(_environ(auth), lambda s, _h, _e=None: status.append(s)))
        if not status[0].startswith("200"):
            raise RuntimeError(f"{variant}: {status[0]}")

    for _ in range(300):
        once()
    best = float("inf")
    for _ in range(rounds):
        started = time.process_time()
        for _ in range(calls):
            once()
        best = min(best, (time.process_time() - started) / calls * 1e6)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--before", type=Path, help="a checkout of an earlier commit: its 'full' runs too"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(measure(args.child, args.calls, args.rounds))
        return 0
    print(f"load average {os.getloadavg()[0]:.2f}; best of {args.rounds} x {args.calls} calls")
    tmp = Path(tempfile.mkdtemp(prefix="bench-inprocess-"))
    catalog = tmp / "catalog.toml"
    catalog.write_text('[models."sim-zero"]\nprovider = "simulated"\nlatency_s = 0.0\n')
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("ES_")},
        "ES_CATALOG": str(catalog),
        "ES_API_KEYS": "bench:bench-key",
        "ES_LOG_LEVEL": "warning",
        "ES_REGION": "bench",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp),
    }
    results: dict[str, float] = {}
    runs = [(v.strip(), REPO) for v in args.variants.split(",") if v.strip()]
    if args.before is not None:
        runs.append(("before", args.before.resolve()))
    for variant, tree in runs:
        child = "full" if variant == "before" else variant
        out = subprocess.run(
            [sys.executable, str(tree / "bench" / Path(__file__).name), "--child", child,
             "--calls", str(args.calls), "--rounds", str(args.rounds)],
            env={**env, "PYTHONPATH": str(tree)}, cwd=tree, capture_output=True, text=True,
            check=True,
        )  # fmt: skip
        results[variant] = float(out.stdout.strip().splitlines()[-1])
        extra = ""
        if "full" in results and variant not in {"full", "bare"}:
            extra = f"  (saves {results['full'] - results[variant]:5.1f} us)"
        print(f"{variant:14s} {results[variant]:7.1f} us CPU per call{extra}", flush=True)
    if "bare" in results and "full" in results:
        print(f"bare / full = {results['bare'] / results['full']:.2f} (in process, no HTTP)")
    if "bare" in results and "before" in results:
        print(f"bare / before = {results['bare'] / results['before']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
