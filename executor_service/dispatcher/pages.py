"""The researcher's workbench pages: a live page per job and a list of jobs.

Server-rendered from the package (Jinja templates, one small script, one style
sheet; no build step, nothing from a CDN). The HTML carries no data: the page's
script asks the JSON API for it, polling, with the key the user typed once on
the page (kept in the browser's sessionStorage, or localStorage if asked, and
sent as a bearer header; never in a URL). So the pages and their static files
are public, while every byte of job data stays behind the API's auth.

    GET /jobs/view              the tenant's jobs, newest first
    GET /jobs/<id>/view         progress per region, retry queue, dead letters, comparison
"""

from __future__ import annotations

from flask import Blueprint, Flask, Response, render_template

from ..auth import public_endpoint

bp = Blueprint(
    "workbench",
    __name__,
    template_folder="templates",
    static_folder="static/workbench",
    static_url_path="/ui/static",
)

# How often the page asks for progress while a job runs: live enough to watch,
# a few small queries a second per open page at most.
POLL_MS = 1000
# Everything the page loads comes from this server; no inline script, no framing. An
# answer that contains markup can only ever be text (the script never uses innerHTML).
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _page(template: str, **context: object) -> Response:
    response = Response(render_template(template, poll_ms=POLL_MS, **context))
    response.headers.update(PAGE_HEADERS)
    return response


@bp.get("/jobs/view")
def jobs_page() -> Response:
    """The list of the tenant's jobs (filled in by the script)."""
    return _page("workbench/jobs.html")


@bp.get("/jobs/<job_id>/view")
def job_page(job_id: str) -> Response:
    """One job's live page (filled in by the script)."""
    return _page("workbench/job.html", job_id=job_id)


def init_app(app: Flask) -> None:
    app.register_blueprint(bp)
    for endpoint in ("jobs_page", "job_page", "static"):
        public_endpoint(app, f"{bp.name}.{endpoint}")
