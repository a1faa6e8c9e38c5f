-- A job waiting on a dead region says so (issue 10, item 5): while a (region, model)'s
-- circuit is not closed, when it opened in this outage (a failed probe reopens it
-- without moving it) and the failure that opened it last ({code, message}).
ALTER TABLE paces ADD COLUMN circuit_since REAL;
ALTER TABLE paces ADD COLUMN circuit_error TEXT;  -- JSON
