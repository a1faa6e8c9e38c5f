"""The dispatcher: jobs of questions x models x regions, kept in a durable store and fanned
out to the executors of many regions. What lives where:

    rules.py        every scheduling rule: claim order, dead-letter, cancel finality,
                    what a failed, reaped or released lease becomes (no I/O)
    scheduler.py    backoff and the circuit breaker (clock and randomness passed in)
    circuit.py      a region's breaker wired to the store; diverting its queued work
    worker.py       the runtime: per region a claim loop and a call pool; heartbeat, reaper
    runtime.py      the runtime's primitives, passed in (threads in production, inline in tests)
    client.py       the HTTP client of the executors (CallResult, Outcome)
    store/          the store interface, its records, and the memory, SQLite and PostgreSQL stores;
                    store/objects.py the Batch API's files and batches and reusable answers
    api.py          the HTTP API (create_dispatcher_app); schemas.py its schemas; jobs.py job
                    validation and limits, and what each call sends (messages, seeds)
    workbench.py    GET /jobs, POST /jobs/<id>/retry, GET /jobs/<id>/compare; compare.py,
                    progress.py, exports.py the pure functions behind them
    pages.py        the job page and the jobs list (templates/, static/: no build step)
    config.py       DispatcherSettings (API and workers), ClientSettings (the CLI)
    regions.py      the regions file;  metrics.py  Prometheus metrics;  gunicorn_config.py
    cli.py          ``executor-service dispatcher [run|api|worker]``: the processes
    commands.py     ``submit``, ``status``, ``results``;  api_client.py  their HTTP client;
                    workbench_commands.py  ``jobs``, ``cancel``, ``retry``, results --format compare
    openai_batch.py the OpenAI Batch API: input files -> jobs (a fan-out per region), the
                    batch status and output files; openai_batch_api.py its routes
                    (/v1/files, /v1/batches); openai_commands.py its CLI side
    reuse.py        reuse of identical calls (params.reuse), looked up by the worker
    demo.py         ``executor-service demo``

A new rule goes in rules.py (and a store applies it); a new route in api.py with its
schema; a new job field in store/models.py, the migrations (store/sql/<dialect>/) and
records.py, then memory.py (the store suite checks all three stores agree).
"""
