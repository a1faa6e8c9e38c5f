"""The Dockerfile, checked without a Docker engine: its instructions, its agreement with
gunicorn.conf.py and the app's routes, its health check run for real against the app,
the build context, hadolint and checkov.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import pytest
from werkzeug.serving import make_server

from executor_service import create_app
from executor_service.auth import PUBLIC_PATHS
from executor_service.config import Settings

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
BIN = Path(sys.executable).parent  # the virtualenv's bin/, not resolved through symlinks

pytestmark = pytest.mark.deploy


@dataclass
class Stage:
    """One FROM ... AS name section: its base image, args and instructions."""

    image: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str:
        found = self.all(keyword)
        assert found, f"stage {self.name} has no {keyword}"
        return found[-1]


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARGs and stages; continuation lines joined, comments dropped."""
    logical: list[str] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            match = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", args.strip(), re.I)
            assert match, f"every stage is named: {line}"
            stages.append(Stage(match.group(1), match.group(2)))
        elif not stages:
            assert keyword == "ARG", line
            name, _, default = args.partition("=")
            global_args[name] = default.strip('"')
        else:
            stages[-1].instructions.append((keyword, args.strip()))
    return global_args, stages


def arg_default(stage: Stage, name: str) -> str:
    for args in stage.all("ARG"):
        key, _, value = args.partition("=")
        if key == name:
            return value.strip('"')
    raise AssertionError(f"stage {stage.name} has no ARG {name}")


def env_of(stage: Stage) -> dict[str, str]:
    """ENV key=value pairs of a stage, ${ARG} references resolved to the ARG defaults."""
    env: dict[str, str] = {}
    for args in stage.all("ENV"):
        for key, quoted, bare in re.findall(r'(\w+)=(?:"([^"]*)"|(\S+))', args):
            value = quoted or bare
            value = re.sub(r"\$\{(\w+)\}", lambda m: _arg_or_env(stage, env, m.group(1)), value)
            env[key] = value
    return env


def _arg_or_env(stage: Stage, env: dict[str, str], name: str) -> str:
    if name in env:
        return env[name]
    try:
        return arg_default(stage, name)
    except AssertionError:
        return "${" + name + "}"


@pytest.fixture(scope="module")
def global_args() -> dict[str, str]:
    """The ARGs before the first FROM (usable in FROM lines), with their defaults."""
    args, _ = parse_dockerfile(DOCKERFILE.read_text())
    return args


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    _, parsed = parse_dockerfile(DOCKERFILE.read_text())
    return parsed


def stage(stages: list[Stage], name: str) -> Stage:
    found = [s for s in stages if s.name == name]
    assert len(found) == 1, f"one stage named {name}"
    return found[0]


@pytest.fixture(scope="module")
def runtime(stages: list[Stage]) -> Stage:
    return stages[-1]


@pytest.fixture(scope="module")
def gunicorn_defaults(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """What gunicorn.conf.py (the file the image starts with) sets with no env overrides."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not (k.startswith(("GUNICORN_", "ES_")) or k in {"PORT", "HOST", "WEB_CONCURRENCY"})
    }
    env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path_factory.mktemp("metrics"))
    code = (
        "import json, runpy; c = runpy.run_path('gunicorn.conf.py'); "
        "print(json.dumps({'bind': c['bind'], 'graceful_timeout': c['graceful_timeout']}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, check=True
    )
    settings: dict[str, Any] = json.loads(done.stdout)
    host, _, port = settings["bind"][0].rpartition(":")
    settings.update(host=host, port=int(port))
    return settings


# --------------------------------------------------------------- instructions ---


def test_base_image_is_a_pinned_slim_python(
    stages: list[Stage], global_args: dict[str, str]
) -> None:
    assert len(stages) >= 2, "multi-stage: a builder and a runtime"
    # One base for every stage, through a build argument (`make image` sets it to the
    # local Debian base), so the venv built in one stage runs in the other.
    assert {s.image for s in stages} == {"${BASE_IMAGE}"}
    # Its default is what a real registry build uses: a pinned patch release on a
    # named Debian release, e.g. python:3.11.14-slim-bookworm.
    repo, _, tag = global_args["BASE_IMAGE"].partition(":")
    assert repo == "python", global_args["BASE_IMAGE"]
    assert tag and tag != "latest", f"{global_args['BASE_IMAGE']} is not pinned"
    assert re.fullmatch(r"3\.11\.\d+-slim-bookworm", tag), global_args["BASE_IMAGE"]
    # make-base.sh builds the same Debian release for the local base.
    assert "SUITE=bookworm" in (REPO / "scripts" / "image" / "make-base.sh").read_text()


def test_only_the_base_differs_between_a_registry_build_and_make_image() -> None:
    build = (REPO / "scripts" / "image" / "build.sh").read_text()
    build_args = re.findall(r"--build-arg\s+\"?(\w+)=", build)
    assert build_args == ["BASE_IMAGE"]
    assert "--file Dockerfile" in build, "the repository's Dockerfile, not a copy"


def test_llama_cpp_is_compiled_in_the_builder_only(
    stages: list[Stage], runtime: Stage, global_args: dict[str, str]
) -> None:
    builder = stage(stages, "builder")
    requirements = stage(stages, "requirements")
    assert runtime.name == "runtime"
    builder_runs = " ".join(builder.all("RUN"))
    assert "build-essential" in builder_runs and "cmake" in builder_runs
    assert "pip wheel" in builder_runs, "dependencies are built as wheels in the builder"
    for runs in (" ".join(requirements.all("RUN")), builder_runs):
        assert '"[local,postgres]"' in runs, "local: llama-cpp-python and the model"
        assert 'else extras="[postgres]"' in runs, "the dispatcher's PostgreSQL driver"
        assert 'if [ "${WITH_LOCAL_MODEL}" = "true" ]' in runs
    # The embedded model is a build argument, on by default, seen by both stages.
    assert global_args["WITH_LOCAL_MODEL"] == "true"
    assert "WITH_LOCAL_MODEL" in requirements.all("ARG")
    assert "WITH_LOCAL_MODEL" in builder.all("ARG")
    # The wheel steps see the dependency lists only, not pyproject.toml or the code:
    # llama-cpp-python alone first (its compile is cached while other dependencies
    # change), then the rest.
    names = [kw for kw, _ in builder.instructions]
    wheel_steps = [
        i for i, (kw, args) in enumerate(builder.instructions) if "--requirement" in args
    ]
    assert len(wheel_steps) == 2
    assert builder.instructions[wheel_steps[0] - 1] == (
        "COPY",
        "--from=requirements /src/compiled.txt ./",
    )
    assert "--requirement compiled.txt" in builder.instructions[wheel_steps[0]][1]
    assert builder.instructions[wheel_steps[1] - 1] == (
        "COPY",
        "--from=requirements /src/requirements.txt ./",
    )
    assert "--find-links /wheels" in builder.instructions[wheel_steps[1]][1]
    assert "COPY" not in names[: wheel_steps[0] - 1], "nothing else is copied before the wheels"
    assert "-DGGML_NATIVE=OFF" in arg_default(builder, "LLAMA_CMAKE_ARGS")

    runtime_runs = " ".join(runtime.all("RUN"))
    for compiler in ("build-essential", "gcc", "cmake", "apt-get install", "pip install"):
        assert compiler not in runtime_runs, f"runtime stage installs {compiler}"
    assert "--from=builder /opt/venv /opt/venv" in runtime.all("COPY")[0]


def test_runs_as_a_non_root_user(runtime: Stage) -> None:
    user = runtime.last("USER")
    uid = user.split(":")[0]
    assert uid not in {"root", "0"}
    assert uid.isdigit() and int(uid) >= 1000, "a numeric uid a platform can verify"
    # Nothing after USER switches back.
    index = runtime.instructions.index(("USER", user))
    assert all(kw != "USER" for kw, _ in runtime.instructions[index + 1 :])


def test_environment_of_the_runtime(runtime: Stage, gunicorn_defaults: dict[str, Any]) -> None:
    env = env_of(runtime)
    assert env["PYTHONUNBUFFERED"] == "1", "logs must not sit in a buffer when the app dies"
    assert env["PORT"] == str(gunicorn_defaults["port"])
    assert env["HOST"] == gunicorn_defaults["host"] == "0.0.0.0"
    assert env["PATH"].startswith("/opt/venv/bin:")


def test_cmd_starts_gunicorn_with_its_config_in_exec_form(runtime: Stage) -> None:
    cmd = runtime.last("CMD")
    # Exec form (a JSON array): gunicorn is PID 1 and receives SIGTERM itself.
    assert json.loads(cmd) == ["gunicorn", "--config", "gunicorn.conf.py", "wsgi:app"]
    assert runtime.all("ENTRYPOINT") == []
    copied = " ".join(runtime.all("COPY"))
    assert "wsgi.py" in copied and "gunicorn.conf.py" in copied
    assert runtime.last("WORKDIR") == "/app"
    # The module and attribute the CMD names exist: wsgi.py defines `app`.
    assert re.search(r"^app = create_app\(\)$", (REPO / "wsgi.py").read_text(), re.M)


def test_exposes_the_port_gunicorn_binds(runtime: Stage, gunicorn_defaults: dict[str, Any]) -> None:
    exposed = runtime.last("EXPOSE")
    port = re.sub(r"\$\{(\w+)\}", lambda m: arg_default(runtime, m.group(1)), exposed)
    assert int(port) == gunicorn_defaults["port"] == 8000


def healthcheck_command(runtime: Stage) -> list[str]:
    check = runtime.last("HEALTHCHECK")
    options, _, cmd = check.partition("CMD ")
    assert "--interval=" in options and "--timeout=" in options
    command = json.loads(cmd)
    assert isinstance(command, list), "exec form: no shell needed"
    return [str(part) for part in command]


def test_healthcheck_needs_no_curl(runtime: Stage) -> None:
    command = healthcheck_command(runtime)
    assert command[0] == "python"
    assert not {"curl", "wget"} & set(" ".join(command).split())
    code = command[-1]
    assert "/health" in code and "os.environ.get('PORT', '8000')" in code
    assert "/health" in PUBLIC_PATHS, "the health check carries no API key"


@pytest.fixture()
def live_app(tmp_path: Path, quiet_root_logger: None) -> Iterator[int]:
    """The executor app with API keys on, served on a free loopback port."""
    catalog = tmp_path / "catalog.toml"
    catalog.write_text('[models.sim]\nprovider = "simulated"\n')
    app = create_app(settings=Settings(api_keys="ops:k3y", catalog_path=catalog))
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_port
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def run_healthcheck(command: list[str], port: int) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, *command[1:]]  # the image's `python`, here the test's interpreter
    env = {**os.environ, "PORT": str(port)}
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)


def test_healthcheck_passes_against_the_running_app(runtime: Stage, live_app: int) -> None:
    done = run_healthcheck(healthcheck_command(runtime), live_app)
    assert done.returncode == 0, done.stderr


def test_healthcheck_fails_when_nothing_answers(runtime: Stage) -> None:
    # A port just bound and released: nothing listens there.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        free = sock.getsockname()[1]
    done = run_healthcheck(healthcheck_command(runtime), free)
    assert done.returncode != 0


# --------------------------------------------------------------- build context ---


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule for the patterns used here: the last match wins."""
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        candidates = [pat, pat.removeprefix("**/")]
        if any(fnmatch(p, c) for p in prefixes for c in candidates) or (
            pat.startswith("**/") and any(fnmatch(part, pat[3:]) for part in parts)
        ):
            result = not negate
    return result


def test_dockerignore_sends_only_what_the_build_copies(stages: list[Stage]) -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    sources: list[str] = []
    for stage in stages:
        for args in stage.all("COPY"):
            if "--from=" in args:
                continue
            sources += args.split()[:-1]
    assert sources, "the Dockerfile copies from the context"
    for source in sources:
        assert (REPO / source).exists(), f"COPY {source}: not in the repository"
        assert not ignored(source.rstrip("/"), patterns), f"COPY {source} is excluded"
    assert not ignored("executor_service/executor/default_catalog.toml", patterns)
    for private in (".venv/bin/python", ".git/config", "terraform/terraform.tfstate", "x.db"):
        assert ignored(private, patterns), f"{private} would be sent to the builder"
    assert ignored("executor_service/__pycache__/config.cpython-311.pyc", patterns)


# ----------------------------------------------------------------------- linters ---


def tool(name: str) -> Path:
    path = BIN / name
    if not path.exists():
        pytest.skip(
            f"{name} is not installed in {BIN} (see docs/deploy.md, 'Offline checks'): not run"
        )
    return path


def test_hadolint_passes() -> None:
    done = subprocess.run(
        [str(tool("hadolint")), "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == ""
    # Every rule it is told to ignore is explained on the lines just above.
    lines = DOCKERFILE.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("# hadolint ignore="):
            rule = line.split("=", 1)[1]
            assert rule in lines[i - 4] + lines[i - 3] + lines[i - 2] + lines[i - 1], rule


def test_checkov_passes_on_the_dockerfile() -> None:
    done = subprocess.run(
        [
            str(tool("checkov")),
            "-f",
            "Dockerfile",
            "--framework",
            "dockerfile",
            "--skip-download",
            "--compact",
            "-o",
            "json",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.stdout.strip(), f"checkov printed no report: {done.stderr[-2000:]}"
    report = json.loads(done.stdout)
    results = report["results"]
    failed = results.get("failed_checks", [])
    assert failed == [], "\n".join(f"{c['check_id']} {c['check_name']}" for c in failed)
    for check in results.get("skipped_checks", []):
        assert len(check["check_result"].get("suppress_comment", "")) > 30, check["check_id"]
    assert report["summary"]["passed"] >= 20
