"""The job page in a real headless Chromium (Debian's, driven by Playwright): a job across
three regions, one of them down, watched live on the page; the dead cells re-run with the
page's retry buttons once the region is back; the comparison grid marks the questions
whose regions' answers differ.

Real processes: two (then three) gunicorn executors serving simulated models, and the
``executor-service dispatcher`` command on SQLite. The key is typed into the page once
and never appears in a URL. ``ES_JOB_PAGE_SCREENSHOT=path`` saves the finished page
(README's docs/img/job-page.png is made so).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dispatcher_harness import KEYS, DispatcherProcess, executor, write_regions
from support import Gunicorn

pytestmark = [pytest.mark.slow, pytest.mark.browser]

CHROMIUM = "/usr/bin/chromium"
# Without the background-networking flags Chromium keeps trying to reach Google's
# services, which on a closed network makes every page load wait for timeouts.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
QUESTIONS = [
    "What happened in Tiananmen Square in June 1989?",
    "Who governs Taiwan?",
    "What is the capital of Australia?",
]
# Two simulated models: "probe" answers one way in us-east and eu-west and another
# in asia-east; "control" answers the same everywhere.
PROBE_FREE = "On '{prompt}': protesters were killed when the army cleared the square."
PROBE_CENSORED = "On '{prompt}': I am not able to discuss this topic."
CONTROL = "On '{prompt}': here is a neutral summary."
UI_TIMEOUT_MS = 60_000


def models(probe_output: str) -> dict[str, dict[str, Any]]:
    return {
        "probe": {"provider": "simulated", "latency_s": 0.05, "output": probe_output},
        "control": {"provider": "simulated", "latency_s": 0.05, "output": CONTROL},
    }


@pytest.fixture
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "Debian's chromium is missing: run `make browser`"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


def test_the_job_page_follows_a_job_retries_dead_cells_and_marks_differences(
    tmp_path: Path, browser: Any
) -> None:
    asia = executor(tmp_path, "asia-east", models(PROBE_CENSORED))  # down until started
    with (
        executor(tmp_path, "us-east", models(PROBE_FREE)) as us,
        executor(tmp_path, "eu-west", models(PROBE_FREE)) as eu,
    ):
        regions = write_regions(
            tmp_path / "regions.toml",
            {
                "us-east": (us.url, 2, ["probe", "control"]),
                "eu-west": (eu.url, 2, ["probe", "control"]),
                "asia-east": (asia.url, 2, ["probe", "control"]),
            },
        )
        with regions.open("a") as file:  # prices per million tokens: the page shows a cost
            for region in ("us-east", "eu-west", "asia-east"):
                for model in ("probe", "control"):
                    file.write(f"[regions.{region}.prices.{model}]\nprompt = 0.15\n")
                    file.write("completion = 0.60\n\n")
        env = {
            "ES_BACKOFF_BASE_S": "0.05",
            "ES_BACKOFF_JITTER": "none",
            # the test is about dead cells, not the breaker: keep it closed
            "ES_CIRCUIT_THRESHOLD": "1000",
        }
        with DispatcherProcess(tmp_path, f"sqlite:///{tmp_path / 'd.db'}", regions, env) as d:
            try:
                _drive_the_page(browser, d, asia, tmp_path)
            finally:
                asia.stop()


def _drive_the_page(browser: Any, d: DispatcherProcess, asia: Gunicorn, tmp: Path) -> None:
    from playwright.sync_api import expect

    expect.set_options(timeout=UI_TIMEOUT_MS)
    api = d.api()
    job = api.submit(
        {
            "name": "Regional probe",
            "tags": ["censorship", "demo"],
            "questions": QUESTIONS,
            "models": ["probe", "control"],
            "max_attempts": 2,
        }
    )
    assert job["failover"] == "none"  # the default: a comparison never mixes regions
    key = KEYS["alice"]

    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(UI_TIMEOUT_MS)
    urls: list[str] = []
    authorised: list[str] = []

    def seen(request: Any) -> None:
        urls.append(request.url)
        if request.headers.get("authorization") == f"Bearer {key}":
            authorised.append(request.url)

    page.on("request", seen)
    problems: list[str] = []  # script errors, CSP refusals: the page must have none
    page.on("pageerror", lambda exc: problems.append(str(exc)))
    page.on(
        "console",
        lambda m: m.type == "error" and "401" not in m.text and problems.append(m.text),
    )
    page.goto(f"{d.url}/jobs/{job['id']}/view")

    # The page asks for the key once; it goes to sessionStorage and a bearer header.
    expect(page.locator("#key-form")).to_be_visible()
    page.fill("#key-input", key)
    page.click("#key-form button[type=submit]")
    expect(page.locator("#key-form")).to_be_hidden()
    expect(page.locator("#job-name")).to_have_text("Regional probe")

    # asia-east is down: its cells die, the job finishes, and the page says 67 %, not 100 %.
    expect(page.locator("#job-state")).to_have_text("finished")
    expect(page.locator("#dead-count")).to_have_text("6")
    expect(page.locator("#overall-label")).to_contain_text("67% succeeded")
    expect(page.locator("#overall-label")).to_contain_text("6 dead")
    asia_row = page.locator("#regions-table tr[data-region=asia-east]")
    expect(asia_row).to_contain_text("0% succeeded")
    dead_rows = page.locator("#dead-table tr.dead")
    expect(dead_rows).to_have_count(2)  # one per (model, region): probe and control in asia
    expect(dead_rows.first).to_contain_text("connection_error")
    expect(page.locator("table.compare tr.differs")).to_have_count(0)  # dead is no answer

    target = os.environ.get("ES_JOB_PAGE_SCREENSHOT")
    if target:  # the dead letters with their retry buttons, as the README shows them
        page.screenshot(path=target.replace(".png", "-dead.png"), full_page=True)

    # The region comes back: one dead cell's retry button, then "Retry all dead".
    asia.start()
    page.locator("#dead-table tr[data-model=probe][data-region=asia-east] button.retry").click()
    expect(page.locator("#notice")).to_contain_text("re-queued 3 executions")
    expect(page.locator("#dead-count")).to_have_text("3")
    page.click("#retry-all")
    expect(page.locator("#overall-label")).to_contain_text("100% succeeded", timeout=UI_TIMEOUT_MS)
    expect(page.locator("#job-state")).to_have_text("finished")
    expect(page.locator("#dead-count")).to_have_text("0")
    expect(asia_row).to_contain_text("100% succeeded")

    # The grid: every probe question differs (asia-east refuses), with the differing
    # words highlighted; the control model answers the same everywhere.
    probe = page.locator("table.compare[data-model=probe]")
    expect(probe.locator("tbody tr.differs")).to_have_count(len(QUESTIONS))
    first = probe.locator("tbody tr").first
    expect(first.locator(".badge.differs")).to_contain_text("differs")
    expect(first.locator("td.cell").nth(2).locator("mark").first).to_be_visible()
    assert "not" in " ".join(first.locator("td.cell").nth(2).locator("mark").all_inner_texts())
    control = page.locator("table.compare[data-model=control]")
    expect(control.locator("tbody tr.differs")).to_have_count(0)
    expect(control.locator(".badge.same")).to_have_count(len(QUESTIONS))
    expect(page.locator("h3", has_text="probe")).to_contain_text("3 of 3 rows differ")

    expect(page.locator("#usage-table tbody tr").first).to_contain_text("$0.000161")
    shot = tmp / "job-page.png"
    page.screenshot(path=str(shot), full_page=True)
    if target:
        shutil.copyfile(shot, target)

    assert problems == []
    # Never the key in a URL; every API call carried it as a bearer header.
    assert urls and not [u for u in urls if key in u]
    assert any(u.endswith(f"/jobs/{job['id']}/compare") for u in authorised)
    stored = page.evaluate("() => sessionStorage.getItem('executor-service.dispatcher-key')")
    assert stored == key

    # The jobs list (same tab: the key is kept) links back to the job's page.
    page.goto(f"{d.url}/jobs/view")
    listed = page.locator(f"#jobs-table tr[data-job-id='{job['id']}']")
    expect(listed).to_contain_text("Regional probe")
    expect(listed).to_contain_text("finished")
    expect(page.locator("#key-form")).to_be_hidden()
    listed.locator("a").click()
    expect(page.locator("#job-name")).to_have_text("Regional probe")
    context.close()

    # What the page showed is what the API says.
    final = api.job(job["id"])
    assert final["progress"]["succeeded"] == final["total"] == 18
    ran = {
        (e["requested_region"], e["executed_region"]) for e in api.results(job["id"])["executions"]
    }
    assert ran == {(r, r) for r in ("us-east", "eu-west", "asia-east")}
