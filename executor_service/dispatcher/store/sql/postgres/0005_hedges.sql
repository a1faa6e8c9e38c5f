-- Hedged calls and schedule-to-start (issue 13, item 6; dispatcher/hedging.py).

-- Hedges sent for an execution: every call sent has its own attempt-log number and
-- request id, attempts + deferrals + hedges. hedged_lease: the lease token last hedged
-- (one hedge per lease); that lease's own call keeps the number it was sent with, one
-- below the hedge's (the results' call_number subtracts it).
ALTER TABLE executions ADD COLUMN hedges integer NOT NULL DEFAULT 0;
ALTER TABLE executions ADD COLUMN hedged_lease text;

-- A call that holds a region's seat without being the execution's lease: a hedge in
-- flight, or the loser of a hedge race still running (its lease turned into a seat
-- when the hedge answered first). A claim counts these with the leased executions, so
-- a hedge never pushes a region over its concurrency; a seat ends when its call does
-- (end_seat), or at lease_expires_at, when the call has surely ended (its deadline).
CREATE TABLE hedge_seats (
    token            text PRIMARY KEY,
    execution_id     bigint NOT NULL REFERENCES executions (id) ON DELETE CASCADE,
    region           text NOT NULL,
    model            text NOT NULL,
    number           integer NOT NULL,            -- the call's attempt-log number
    hedge_of         text,                        -- a hedge: the lease token it races
    started_at       double precision NOT NULL,
    lease_expires_at double precision NOT NULL
);
CREATE INDEX hedge_seats_region ON hedge_seats (region, lease_expires_at);
CREATE INDEX hedge_seats_execution ON hedge_seats (execution_id);

-- Schedule-to-start: an idle region takes other regions' oldest queued failover-any work.
CREATE INDEX executions_queued_age ON executions (created_at, id)
    WHERE state = 'queued' AND failover = 'any';
