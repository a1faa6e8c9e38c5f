-- The dispatcher's store on PostgreSQL: jobs, their executions, each attempt, region circuits.
-- Times are float seconds since the epoch (double precision), JSON is jsonb.
-- Partial indexes repeat the literal state of the queries that use them, so every
-- claim step is an index range scan.

CREATE TABLE jobs (
    id               text PRIMARY KEY,            -- uuid4 hex
    tenant           text NOT NULL,
    idempotency_key  text,
    request_hash     text NOT NULL DEFAULT '',
    failover         text NOT NULL CHECK (failover IN ('any', 'none')),
    max_attempts     integer NOT NULL CHECK (max_attempts >= 1),
    priority         integer NOT NULL,
    questions        jsonb NOT NULL,
    models           jsonb NOT NULL,
    regions_by_model jsonb NOT NULL,
    params           jsonb NOT NULL,
    total            integer NOT NULL,            -- executions
    created_at       double precision NOT NULL,
    cancelled        boolean NOT NULL DEFAULT false
);

CREATE UNIQUE INDEX jobs_tenant_idempotency_key
    ON jobs (tenant, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX jobs_tenant_created ON jobs (tenant, created_at);

CREATE TABLE executions (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id           text NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    tenant           text NOT NULL,
    question_index   integer NOT NULL,
    question         text NOT NULL,
    model            text NOT NULL,
    requested_region text NOT NULL,
    executed_region  text,                        -- where it runs (leased) or last ran
    last_region      text,                        -- where it last failed
    state            text NOT NULL CHECK (
        state IN ('queued', 'leased', 'succeeded', 'retry_wait', 'dead', 'cancelled')),
    attempts         integer NOT NULL DEFAULT 0,
    max_attempts     integer NOT NULL,
    failover         text NOT NULL,
    priority         integer NOT NULL,
    job_created_at   double precision NOT NULL,
    due_at           double precision,
    failed_at        double precision,
    lease_token      text,
    lease_expires_at double precision,
    leased_by        text,
    leased_at        double precision,            -- start of the current attempt
    claimed_from     text,                        -- global_retry | own_retry | new
    output           text,
    result           jsonb,                       -- the executor's 200 body
    last_error       jsonb,
    created_at       double precision NOT NULL,
    finished_at      double precision
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
    execution_id bigint NOT NULL REFERENCES executions (id) ON DELETE CASCADE,
    number       integer NOT NULL,                -- 1-based
    region       text NOT NULL,
    started_at   double precision NOT NULL,
    finished_at  double precision,
    ok           boolean NOT NULL,
    error        jsonb,
    PRIMARY KEY (execution_id, number)
);

CREATE TABLE regions (
    name       text PRIMARY KEY,
    circuit    text NOT NULL DEFAULT 'closed' CHECK (circuit IN ('closed', 'open', 'half_open')),
    open_until double precision
);
