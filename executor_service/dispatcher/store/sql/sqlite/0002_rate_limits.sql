-- Rate limits and backpressure (issue 9): deferrals that are not attempts, the shared
-- pacing state of each (region, model), and the job deadline (schedule-to-close).

-- A deferral (429, 503 overloaded) is logged in attempts but not counted in attempts:
-- the attempt log's number is attempts + deferrals (every call sent has its own).
ALTER TABLE executions ADD COLUMN deferrals INTEGER NOT NULL DEFAULT 0;

-- The job's deadline (created_at + deadline_s); expired: its leftovers were made dead.
ALTER TABLE jobs ADD COLUMN deadline_at REAL;
ALTER TABLE jobs ADD COLUMN expired INTEGER NOT NULL DEFAULT 0;
CREATE INDEX jobs_open_deadline ON jobs (deadline_at) WHERE expired = 0;

-- One row per (region, model): pacing.Pace, shared by every dispatcher process.
CREATE TABLE paces (
    region             TEXT NOT NULL,
    model              TEXT NOT NULL,
    max_limit          INTEGER NOT NULL,           -- the configured concurrency
    lim                INTEGER NOT NULL,           -- adaptive concurrency now (AIMD)
    not_before         REAL,                       -- no claim before (Retry-After, reset)
    success_run        INTEGER NOT NULL DEFAULT 0,
    decreased_at       REAL,
    requests           REAL,                       -- rpm bucket level (NULL: full)
    tokens             REAL,                       -- tpm bucket level (NULL: full)
    level_at           REAL,
    deferrals          INTEGER NOT NULL DEFAULT 0,
    circuit            TEXT NOT NULL DEFAULT 'closed'
        CHECK (circuit IN ('closed', 'open', 'half_open')),
    circuit_open_until REAL,
    PRIMARY KEY (region, model)
);
