"""A newcomer's first contact, as they would have it: the documented command with its
defaults (``executor-service serve``, ``executor-service dispatcher``), the README's own
curl lines run by bash, and what they see (the status, the message, the page).

Only what the README tells the user to set is set: ``ES_API_KEYS`` (and the dispatcher's
``ES_REGIONS_FILE``); every other ``ES_*`` variable of the test process is removed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import pytest
import requests
from support import REPO, free_port, wait_until

pytestmark = [pytest.mark.slow]

CLI = Path(sys.executable).parent / "executor-service"
README = REPO / "README.md"
KEY = "first-contact-key"
CURL = shutil.which("curl")


def user_env(**extra: str) -> dict[str, str]:
    """The environment of a user who has set nothing but what the README says."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ES_", "PROMETHEUS_"))}
    env.update(extra)
    return env


@contextmanager
def serve(tmp: Path, command: list[str], env: Mapping[str, str], ready: str) -> Iterator[str]:
    """Run ``executor-service COMMAND --port P`` in ``tmp``; yield its URL once ``ready`` is 200."""
    port = free_port()
    log_path = tmp / f"{command[0]}-{port}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [str(CLI), *command, "--port", str(port)],
            env=dict(env),
            cwd=tmp,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert proc.poll() is None, log_path.read_text(errors="replace")
        return requests.get(url + ready, timeout=5).status_code == 200

    try:
        wait_until(up, 120, 0.2, what=f"{command[0]} on {url}")
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


@pytest.fixture(scope="module")
def executor_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`executor-service serve` with the packaged catalog (SmolLM2) and one key."""
    tmp = tmp_path_factory.mktemp("serve")
    with serve(tmp, ["serve", "--workers", "1"], user_env(ES_API_KEYS=KEY), "/ready") as url:
        yield url


def readme_curl_commands(section: str) -> list[str]:
    """The curl commands of the README's ``section`` (a ``## `` or ``### `` title), with
    their continuation lines joined, comments and ``#`` results left out."""
    text = README.read_text()
    start = text.index(section)
    end = text.find("\n## ", start + len(section))
    blocks = re.findall(r"```sh\n(.*?)```", text[start : end if end > 0 else None], re.S)
    commands: list[str] = []
    for block in blocks:
        joined = re.sub(r"\\\n\s*", " ", block)
        commands += [line for line in joined.splitlines() if line.startswith("curl ")]
    return commands


def run_curl(command: str, url: str) -> subprocess.CompletedProcess[str]:
    """Run a README curl line with bash, as pasted into a shell where ``KEY`` is exported."""
    assert CURL, "curl is not installed: apt-get install curl"
    line = command.replace("localhost:8000", url).replace("localhost:8100", url)
    return subprocess.run(
        ["bash", "-c", line + " -w '\\n%{http_code}'"],
        env=user_env(KEY=KEY),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_no_curl_example_hides_a_variable_in_single_quotes() -> None:
    """`-H 'Authorization: Bearer $KEY'` sends the text $KEY: the shell expands nothing
    inside single quotes."""
    docs = [README, *sorted((REPO / "docs").glob("*.md"))]
    offenders = [
        f"{path.name}: {line.strip()}"
        for path in docs
        for line in path.read_text().splitlines()
        if "curl " in line and any("$" in quoted for quoted in re.findall(r"'([^']*)'", line))
    ]
    assert offenders == []


@pytest.mark.model
def test_readme_executor_curl_examples_work_with_a_key(executor_url: str) -> None:
    """Every curl line of the executor's README section, pasted into bash with KEY set:
    the one with the key is answered, none is refused for a wrong key."""
    commands = readme_curl_commands("## The executor")
    with_key = [c for c in commands if "Authorization" in c]
    assert with_key, "the README shows how to send the key"
    for command in with_key:
        result = run_curl(command, executor_url)
        body, status = result.stdout.rsplit("\n", 1)
        assert status == "200", f"{command}\n{body}"
        assert json.loads(body)["output"].strip()
    # The README lines without a key meet a server that has one: 401, never a 500.
    for command in set(commands) - set(with_key):
        result = run_curl(command, executor_url)
        assert result.stdout.rsplit("\n", 1)[1] == "401", command


@pytest.mark.model
def test_a_body_without_json_content_type_says_to_send_it(executor_url: str) -> None:
    """`curl -d '{...}'` sends `application/x-www-form-urlencoded`: the answer says to
    send `Content-Type: application/json`, not that the model is missing."""
    assert CURL
    result = subprocess.run(
        [CURL, "-s", "-w", "\n%{http_code}", f"{executor_url}/execute",
         "-H", f"Authorization: Bearer {KEY}",
         "-d", '{"model": "smollm2-135m", "prompt": "hi"}'],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    body, status = result.stdout.rsplit("\n", 1)
    assert status == "415"
    error = json.loads(body)["error"]
    assert error["code"] == "unsupported_media_type"
    assert "Content-Type: application/json" in error["message"]
    assert "application/x-www-form-urlencoded" in error["message"]


class _Assets(HTMLParser):
    """The script and stylesheet URLs of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "script" and found.get("src"):
            self.urls.append(found["src"] or "")
        if tag == "link" and found.get("href"):
            self.urls.append(found["href"] or "")


@pytest.mark.model
def test_docs_open_in_a_browser_with_keys_set_and_need_no_internet(executor_url: str) -> None:
    """What a browser does with /docs: it sends no key, loads every script and style the
    page names (all from this server: no CDN), then fetches the OpenAPI document."""
    page = requests.get(executor_url + "/docs", timeout=10)
    assert page.status_code == 200
    assert page.headers["Content-Type"].startswith("text/html")
    parser = _Assets()
    parser.feed(page.text)
    assert len(parser.urls) >= 3, page.text
    for ref in parser.urls:
        url = urljoin(executor_url + "/docs", ref)
        assert urlsplit(url).netloc == urlsplit(executor_url).netloc, f"{ref} is not local"
        asset = requests.get(url, timeout=10)
        assert asset.status_code == 200, ref
        assert len(asset.content) > 1000, ref
    spec_url = re.search(r'url: "([^"]+)"', page.text)
    assert spec_url, page.text
    spec = requests.get(urljoin(executor_url, spec_url.group(1)), timeout=10)
    assert spec.status_code == 200
    assert "/execute" in spec.json()["paths"]
    # The API itself still wants the key.
    assert requests.get(executor_url + "/models", timeout=10).status_code == 401


def test_dispatcher_says_to_send_json_content_type(tmp_path: Path) -> None:
    """`executor-service dispatcher` as the README runs it (regions file, SQLite default
    store in the working directory): a job posted with plain `curl -d` gets 415."""
    assert CURL
    regions = tmp_path / "regions.toml"
    regions.write_text(
        '[regions.local]\nurl = "http://127.0.0.1:9"\nconcurrency = 1\nmodels = ["smollm2-135m"]\n'
    )
    env = user_env(ES_REGIONS_FILE=str(regions), ES_API_KEYS=KEY)
    with serve(tmp_path, ["dispatcher"], env, "/health") as url:
        result = subprocess.run(
            [CURL, "-s", "-w", "\n%{http_code}", f"{url}/jobs",
             "-H", f"Authorization: Bearer {KEY}",
             "-d", '{"questions": ["hi"], "models": ["smollm2-135m"]}'],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        body, status = result.stdout.rsplit("\n", 1)
        assert status == "415", body
        error = json.loads(body)["error"]
        assert error["code"] == "unsupported_media_type"
        assert "Content-Type: application/json" in error["message"]
        # /docs of the dispatcher opens without a key too.
        assert requests.get(url + "/docs", timeout=10).status_code == 200
        assert requests.get(url + "/openapi.json", timeout=10).status_code == 200


# -- starting: one line naming the variable, never a traceback --------------------------
def start_fails(tmp: Path, argv: list[str], env: Mapping[str, str]) -> tuple[int, list[str]]:
    """Run a start command that must refuse to start; its exit code and output lines."""
    result = subprocess.run(
        argv, env=dict(env), cwd=tmp, capture_output=True, text=True, timeout=60
    )
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    return result.returncode, lines


def test_missing_catalog_is_one_line_naming_es_catalog(tmp_path: Path) -> None:
    env = user_env(ES_CATALOG=str(tmp_path / "no-such-catalog.toml"))
    code, lines = start_fails(tmp_path, [str(CLI), "serve", "--port", str(free_port())], env)
    assert code == 2
    assert len(lines) == 1, "\n".join(lines)
    assert lines[0].startswith("executor-service: configuration error: ES_CATALOG=")
    assert "no-such-catalog.toml" in lines[0]
    assert "unset ES_CATALOG" in lines[0]  # what to do


def test_missing_catalog_under_plain_gunicorn_says_so_without_a_traceback(tmp_path: Path) -> None:
    """What the container runs: `gunicorn -c gunicorn.conf.py wsgi:app`."""
    env = user_env(ES_CATALOG=str(tmp_path / "no-such-catalog.toml"), HOST="127.0.0.1",
                   PORT=str(free_port()))  # fmt: skip
    argv = [sys.executable, "-m", "gunicorn", "-c", str(REPO / "gunicorn.conf.py"), "wsgi:app"]
    result = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Traceback" not in output
    assert "Worker failed to boot" not in output
    errors = [line for line in output.splitlines() if "ES_CATALOG" in line]
    assert len(errors) == 1, output
    assert "configuration error: ES_CATALOG=" in errors[0]


def regions_file(tmp: Path, api_key_env: str | None = None) -> Path:
    path = tmp / "regions.toml"
    key = f'api_key_env = "{api_key_env}"\n' if api_key_env else ""
    path.write_text(
        f'[regions.r1]\nurl = "http://127.0.0.1:9"\nconcurrency = 1\nmodels = ["m"]\n{key}'
    )
    return path


@pytest.mark.postgres
def test_wrong_database_name_is_one_line_naming_es_database_url(tmp_path: Path) -> None:
    from dispatcher_harness import POSTGRES_URL

    url = POSTGRES_URL.rsplit("/", 1)[0] + "/no_such_database_fc"
    env = user_env(ES_REGIONS_FILE=str(regions_file(tmp_path)), ES_DATABASE_URL=url)
    code, lines = start_fails(tmp_path, [str(CLI), "dispatcher", "--port", str(free_port())], env)
    assert code == 2
    assert len(lines) == 1, "\n".join(lines)
    assert lines[0].startswith("executor-service: configuration error: ES_DATABASE_URL=")
    assert 'database "no_such_database_fc" does not exist' in lines[0]


@pytest.mark.postgres
def test_unset_region_key_stops_the_start_before_any_migration(tmp_path: Path) -> None:
    import psycopg
    from dispatcher_harness import postgres_database

    key_env = "FC_REGION_KEY_THAT_IS_NOT_SET"
    with postgres_database() as url:
        short = "postgres://" + url.split("://", 1)[1]  # the scheme the issue was hit with
        env = user_env(ES_REGIONS_FILE=str(regions_file(tmp_path, key_env)), ES_DATABASE_URL=short)
        env.pop(key_env, None)
        argv = [str(CLI), "dispatcher", "--port", str(free_port())]
        code, lines = start_fails(tmp_path, argv, env)
        assert code == 2
        assert len(lines) == 1, "\n".join(lines)
        assert key_env in lines[0] and "'r1'" in lines[0]
        with psycopg.connect(url) as conn:
            tables = conn.execute(
                "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
            ).fetchone()
        assert tables == (0,), "a migration ran before the start was refused"


# -- a healthy start: no warning, each role's own metrics and log fields ----------------
def test_executor_start_logs_no_warning(tmp_path: Path) -> None:
    catalog = tmp_path / "catalog.toml"
    catalog.write_text('[models."sim"]\nprovider = "simulated"\n')
    with serve(tmp_path, ["serve", "--workers", "1"], user_env(ES_CATALOG=str(catalog)), "/ready"):
        pass
    log = next(tmp_path.glob("serve-*.log")).read_text()
    assert "Booting worker" in log
    assert [line for line in log.splitlines() if "WARNING" in line] == []


def test_dispatcher_metrics_and_logs_are_its_own(tmp_path: Path) -> None:
    env = user_env(ES_REGIONS_FILE=str(regions_file(tmp_path)))
    with serve(tmp_path, ["dispatcher"], env, "/health") as url:
        metrics = requests.get(url + "/metrics", timeout=10).text
    names = {line.split("{")[0].split(" ")[0] for line in metrics.splitlines() if line[:1] != "#"}
    assert any(name.startswith("dispatcher_") for name in names), metrics[:2000]
    assert sorted(n for n in names if n.startswith("executor_")) == []
    log = next(tmp_path.glob("dispatcher-*.log")).read_text()
    records = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert records, log
    assert [r for r in records if r.get("region") == "local"] == []


# -- make demo: every answer in full, and the job kept where the user can look again ----
def table_rows(output: str) -> list[list[str]]:
    """The body rows of the rich table in ``output``, each cell's wrapped lines joined."""
    rows: list[list[str]] = []
    current: list[list[str]] | None = None
    for line in output.splitlines():
        if line.startswith("│"):
            cells = [c.strip() for c in line.strip("│").split("│")]
            if current is None:
                current = [[] for _ in cells]
            for parts, cell in zip(current, cells, strict=True):
                if cell:
                    parts.append(cell)
        elif current is not None:  # a separator or the bottom border ends a row
            rows.append([" ".join(parts) for parts in current])
            current = None
    return rows


def test_demo_prints_every_answer_in_full_and_keeps_the_job(tmp_path: Path) -> None:
    """`executor-service demo --simulated` (the README's fast demo) with its output in a
    pipe, in a fresh user's home: whole lines, whole answers, and the printed commands
    that show the job again work after the demo has stopped."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in user_env(HOME=str(home)).items() if k != "XDG_STATE_HOME"}
    result = subprocess.run(
        [str(CLI), "demo", "--simulated"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    lines = out.splitlines()
    regions = ("us-east", "eu-west", "asia-pacific")
    assert lines[0] == f"starting 3 executors (simulated model smollm2-135m): {', '.join(regions)}"
    assert "…" not in out
    rows = table_rows(out)
    assert len(rows) == 4, out
    for question, *answers in rows:
        assert answers == [f"({r}) simulated answer to: {question}" for r in regions]
    store = home / ".local" / "state" / "executor-service" / "demo"
    assert f"The job is kept in {store / 'dispatcher.db'}. To look at it again:" in lines
    job_id = re.search(r"^job ([0-9a-f]{32}): 4 questions x 3 regions$", out, re.M)
    assert job_id, out
    commands = [line.strip() for line in lines[lines.index(next(
        x for x in lines if x.startswith("The job is kept in"))) + 1 :]]  # fmt: skip
    api_line, status_line, results_line, kill_line = commands
    assert api_line.endswith(" dispatcher api &") and kill_line.startswith("kill %1")
    # The API on 127.0.0.1:8100 (ES_DISPATCHER_URL's default), as printed; on a busy
    # machine another port, given to both sides the documented way.
    port, extra, client_env = 8100, "", dict(env)
    if requests_port_busy(8100):
        port = free_port()
        extra = f" --port {port}"
        client_env["ES_DISPATCHER_URL"] = f"http://127.0.0.1:{port}"
    api = subprocess.Popen(
        ["bash", "-c", f"exec env {api_line.removesuffix(' &')}{extra}"],
        env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_until(lambda: requests.get(f"http://127.0.0.1:{port}/health", timeout=2).ok, 60, 0.2)
        status = subprocess.run(["bash", "-c", status_line], env=client_env, cwd=tmp_path,
                                capture_output=True, text=True, timeout=60)  # fmt: skip
        assert status.returncode == 0, status.stderr
        assert f"job {job_id.group(1)} (finished)" in status.stdout
        assert "12/12 succeeded (100%)" in status.stdout
        header = next(x for x in status.stdout.splitlines() if "queued" in x).split()
        assert header == ["region", "queued", "leased", "retry_wait", "succeeded", "dead",
                          "cancelled", "total"]  # fmt: skip
        assert "asia-pacific" in status.stdout.split()
        shown = subprocess.run(["bash", "-c", results_line], env=client_env, cwd=tmp_path,
                               capture_output=True, text=True, timeout=60)  # fmt: skip
        assert shown.returncode == 0, shown.stderr
        assert "…" not in shown.stdout
        # Narrow columns fold long words: compare the text without its line breaks.
        answers = {"".join(row[-1].split()) for row in table_rows(shown.stdout)}
        expected = "(eu-west) simulated answer to: Give one synonym for the word happy."
        assert "".join(expected.split()) in answers
    finally:
        api.send_signal(signal.SIGTERM)
        api.wait(30)


def requests_port_busy(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_readme_demo_sample_shows_what_it_says() -> None:
    """The README's demo sample has every question of the demo, and says so."""
    from executor_service.dispatcher.demo import QUESTIONS

    text = README.read_text()
    section = text[text.index("### The demo (`make demo`)") :]
    intro, sample = section.split("```\n", 2)[:2]
    assert f"all {len(QUESTIONS)} questions" in " ".join(intro.split())
    rows = table_rows(sample)
    assert [row[0] for row in rows] == list(QUESTIONS)
    assert "…" not in sample
