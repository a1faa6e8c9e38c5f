-- Rate limits and backpressure (issue 9): deferrals that are not attempts, the shared
-- pacing state of each (region, model), and the job deadline (schedule-to-close).

-- A deferral (429, 503 overloaded) is logged in attempts but not counted in attempts:
-- the attempt log's number is attempts + deferrals (every call sent has its own).
ALTER TABLE executions ADD COLUMN deferrals integer NOT NULL DEFAULT 0;

-- The job's deadline (created_at + deadline_s); expired: its leftovers were made dead.
ALTER TABLE jobs ADD COLUMN deadline_at double precision;
ALTER TABLE jobs ADD COLUMN expired boolean NOT NULL DEFAULT false;
CREATE INDEX jobs_open_deadline ON jobs (deadline_at) WHERE NOT expired;

-- One row per (region, model): pacing.Pace, shared by every dispatcher process.
CREATE TABLE paces (
    region             text NOT NULL,
    model              text NOT NULL,
    max_limit          integer NOT NULL,           -- the configured concurrency
    lim                integer NOT NULL,           -- adaptive concurrency now (AIMD)
    not_before         double precision,           -- no claim before (Retry-After, reset)
    success_run        integer NOT NULL DEFAULT 0,
    decreased_at       double precision,
    requests           double precision,           -- rpm bucket level (NULL: full)
    tokens             double precision,           -- tpm bucket level (NULL: full)
    level_at           double precision,
    deferrals          bigint NOT NULL DEFAULT 0,
    circuit            text NOT NULL DEFAULT 'closed'
        CHECK (circuit IN ('closed', 'open', 'half_open')),
    circuit_open_until double precision,
    PRIMARY KEY (region, model)
);
