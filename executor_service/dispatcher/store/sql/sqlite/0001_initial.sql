-- The dispatcher's store on SQLite: jobs, their executions, each attempt, region circuits.
-- Times are float seconds since the epoch (REAL); JSON is TEXT.
-- Partial indexes repeat the literal state of the queries that use them, so every
-- claim step is an index range scan (SQLite only uses a partial index when the
-- query's WHERE contains the index's WHERE terms literally).

CREATE TABLE jobs (
    id               TEXT PRIMARY KEY,            -- uuid4 hex
    tenant           TEXT NOT NULL,
    idempotency_key  TEXT,
    request_hash     TEXT NOT NULL DEFAULT '',
    failover         TEXT NOT NULL CHECK (failover IN ('any', 'none')),
    max_attempts     INTEGER NOT NULL CHECK (max_attempts >= 1),
    priority         INTEGER NOT NULL,
    questions        TEXT NOT NULL,               -- JSON list
    models           TEXT NOT NULL,               -- JSON list
    regions_by_model TEXT NOT NULL,               -- JSON object
    params           TEXT NOT NULL,               -- JSON object
    total            INTEGER NOT NULL,            -- executions
    created_at       REAL NOT NULL,
    cancelled        INTEGER NOT NULL DEFAULT 0
);

CREATE UNIQUE INDEX jobs_tenant_idempotency_key
    ON jobs (tenant, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX jobs_tenant_created ON jobs (tenant, created_at);

CREATE TABLE executions (
    id               INTEGER PRIMARY KEY,
    job_id           TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    tenant           TEXT NOT NULL,
    question_index   INTEGER NOT NULL,
    question         TEXT NOT NULL,
    model            TEXT NOT NULL,
    requested_region TEXT NOT NULL,
    executed_region  TEXT,                        -- where it runs (leased) or last ran
    last_region      TEXT,                        -- where it last failed
    state            TEXT NOT NULL CHECK (
        state IN ('queued', 'leased', 'succeeded', 'retry_wait', 'dead', 'cancelled')),
    attempts         INTEGER NOT NULL DEFAULT 0,
    max_attempts     INTEGER NOT NULL,
    failover         TEXT NOT NULL,
    priority         INTEGER NOT NULL,
    job_created_at   REAL NOT NULL,
    due_at           REAL,
    failed_at        REAL,
    lease_token      TEXT,
    lease_expires_at REAL,
    leased_by        TEXT,
    leased_at        REAL,                        -- start of the current attempt
    claimed_from     TEXT,                        -- global_retry | own_retry | new
    output           TEXT,
    result           TEXT,                        -- JSON: the executor's 200 body
    last_error       TEXT,                        -- JSON
    created_at       REAL NOT NULL,
    finished_at      REAL
);

-- claim step 3: new work of one tenant in one region, in claim order.
CREATE INDEX executions_new_work ON executions
    (requested_region, tenant, priority DESC, job_created_at, job_id, question_index, id)
    WHERE state = 'queued';
-- claim step 1: the global retry queue, oldest failure first (or by due time when few are due).
CREATE INDEX executions_global_retry ON executions (failed_at, id)
    WHERE state = 'retry_wait' AND failover = 'any';
CREATE INDEX executions_global_retry_due ON executions (due_at)
    WHERE state = 'retry_wait' AND failover = 'any';
-- claim step 2: a region's own retries (requested there, or failed there).
CREATE INDEX executions_retry_requested ON executions (requested_region, due_at, id)
    WHERE state = 'retry_wait';
CREATE INDEX executions_retry_failed_here ON executions (last_region, due_at, id)
    WHERE state = 'retry_wait';
-- the region's concurrency count, tenants' in-flight counts, and the reaper.
CREATE INDEX executions_leased ON executions (executed_region, tenant)
    WHERE state = 'leased';
CREATE INDEX executions_lease_expiry ON executions (lease_expires_at)
    WHERE state = 'leased';
-- per-job counts, listing, cancel and "finished?" checks.
CREATE INDEX executions_job ON executions (job_id, state, requested_region);
CREATE INDEX executions_dead ON executions (failed_at) WHERE state = 'dead';

CREATE TABLE attempts (
    execution_id INTEGER NOT NULL REFERENCES executions (id) ON DELETE CASCADE,
    number       INTEGER NOT NULL,                -- 1-based
    region       TEXT NOT NULL,
    started_at   REAL NOT NULL,
    finished_at  REAL,
    ok           INTEGER NOT NULL,
    error        TEXT,                            -- JSON
    PRIMARY KEY (execution_id, number)
) WITHOUT ROWID;

CREATE TABLE regions (
    name       TEXT PRIMARY KEY,
    circuit    TEXT NOT NULL DEFAULT 'closed' CHECK (circuit IN ('closed', 'open', 'half_open')),
    open_until REAL
);
