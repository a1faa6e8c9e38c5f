"""The executor: a Flask API that runs one model call per request, and its providers.

    app.py              create_app (also ``executor_service.create_app``, for ``wsgi:app``)
    config.py           ExecutorSettings: catalog, admission, call deadline
    api.py, schemas.py  the routes (``POST /execute``, /ready, /models) and their schemas
    calls.py            the one call path under /execute and /v1: deadline, admission,
                        provider errors -> the contract's, metrics; streamed calls too
    openai_api.py,      the OpenAI-compatible routes (``POST /v1/chat/completions``,
    openai_schemas.py   ``GET /v1/models``): shapes only, on calls.py
    catalog.py          the model catalog (TOML) -> providers
    admission.py        calls in flight per process (503 overloaded beyond)
    metrics.py          Prometheus metrics (``executor_*``)
    gunicorn_config.py  the server settings (also at ``executor_service.gunicorn_config``)
    providers/          llama_cpp (embedded model), openai (any OpenAI-compatible server),
                        simulated (tests, load tests)

A new route goes in its own module registered from api.py's ``init_app`` (or a blueprint
of its own), with its schema; a new setting in config.py (and the README table).
"""
