"""The API docs page (``/docs``), served from the package so it works offline.

flask-smorest renders a Swagger UI page that loads its scripts and styles from
``OPENAPI_SWAGGER_UI_URL``. Pointing that at a CDN makes the page blank without
internet and runs whatever version the CDN serves today; here the assets come
from the pinned ``swagger-ui-bundle`` package, under ``/docs/assets/``.

The page, its assets and ``/openapi.json`` are public (``auth.public_endpoint``):
a browser opening ``/docs`` sends no bearer key, and the document describes the
routes and schemas of this open-source service, nothing about a tenant or its data.
The page's "Authorize" button takes the key for "Try it out" calls, which are
authenticated like any other.
"""

from __future__ import annotations

from flask import Flask, Response, send_from_directory
from swagger_ui_bundle import swagger_ui_path

from .auth import public_endpoint

ASSETS_PREFIX = "/docs/assets/"
# Browsers may keep the assets a day: they change only with the pinned package.
ASSETS_MAX_AGE_S = 86_400


def init_app(app: Flask) -> None:
    """Serve the Swagger UI assets the docs page asks for, and make the page, its assets
    and the OpenAPI document public. Call after flask-smorest's ``Api(app)``."""

    @app.get(ASSETS_PREFIX + "<path:filename>")
    def swagger_ui_asset(filename: str) -> Response:
        return send_from_directory(swagger_ui_path, filename, max_age=ASSETS_MAX_AGE_S)

    prefix = "/" + app.config["OPENAPI_URL_PREFIX"].strip("/")
    pages = {
        f"{prefix.rstrip('/')}/{app.config[key].strip('/')}"
        for key in ("OPENAPI_JSON_PATH", "OPENAPI_SWAGGER_UI_PATH")
    }
    for rule in app.url_map.iter_rules():
        if rule.rule in pages or rule.endpoint == "swagger_ui_asset":
            public_endpoint(app, rule.endpoint)
