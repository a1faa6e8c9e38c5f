-- Named queries of the SQLite store, loaded by name (procrastinate style).
-- Each block starts with "-- name: <name>"; parameters are :name, and lists are
-- passed as JSON arrays read with json_each. States are literals (never
-- parameters): SQLite only uses a partial index when the query repeats its WHERE.

-- name: job_by_key
SELECT * FROM jobs WHERE tenant = :tenant AND idempotency_key = :idempotency_key;

-- name: insert_job
INSERT INTO jobs (id, tenant, idempotency_key, request_hash, failover, max_attempts, priority,
                  questions, models, regions_by_model, params, total, created_at, cancelled,
                  deadline_at, name, tags, samples)
VALUES (:id, :tenant, :idempotency_key, :request_hash, :failover, :max_attempts, :priority,
        :questions, :models, :regions_by_model, :params, :total, :now, 0, :deadline_at,
        :name, :tags, :samples)
RETURNING *;

-- name: get_job
SELECT * FROM jobs WHERE id = :id AND tenant = :tenant;

-- name: job_counts
SELECT requested_region, state, count(*) AS n FROM executions
WHERE job_id = :job_id GROUP BY requested_region, state;

-- name: list_executions
SELECT * FROM executions WHERE job_id = :job_id
ORDER BY question_index, model, requested_region, id;

-- name: list_executions_page
-- The first page of a job's results (LIMIT -1: no limit), on the executions_results index.
SELECT * FROM executions WHERE job_id = :job_id
ORDER BY question_index, model, requested_region, id LIMIT coalesce(:limit, -1);

-- name: list_executions_after
-- The next page: keyset paging after the last key of the previous one.
SELECT * FROM executions
WHERE job_id = :job_id
  AND (question_index, model, requested_region, id)
      > (:after_question, :after_model, :after_region, :after_id)
ORDER BY question_index, model, requested_region, id LIMIT coalesce(:limit, -1);

-- name: list_attempts_of
SELECT * FROM attempts WHERE execution_id IN (SELECT value FROM json_each(:ids))
ORDER BY execution_id, number;

-- name: list_jobs
-- A page of a tenant's jobs, newest first. The phase filter is the job view's, from
-- the cancel flag and two probes of executions_job: something unfinished, something
-- that is not queued (:unfinished / :started are 1, 0 or NULL for "either").
SELECT * FROM jobs j
WHERE j.tenant = :tenant
  AND (:after_created IS NULL OR j.created_at < :after_created
       OR (j.created_at = :after_created AND j.id < :after_id))
  AND (:name IS NULL OR instr(lower(coalesce(j.name, '')), lower(:name)) > 0)
  AND (:cancelled IS NULL OR j.cancelled = :cancelled)
  AND (:unfinished IS NULL OR :unfinished = EXISTS (
        SELECT 1 FROM executions e
        WHERE e.job_id = j.id AND e.state IN ('queued', 'leased', 'retry_wait')))
  AND (:started IS NULL OR :started = EXISTS (
        SELECT 1 FROM executions e WHERE e.job_id = j.id AND e.state <> 'queued'))
ORDER BY j.created_at DESC, j.id DESC LIMIT :limit;

-- name: retry_job
SELECT max_attempts FROM jobs WHERE id = :job_id AND tenant = :tenant;

-- name: uncancel_job
UPDATE jobs SET cancelled = 0 WHERE id = :job_id;

-- name: retry_executions
-- Back to the requested region's queue with a fresh budget of attempts.
UPDATE executions
SET state = 'queued', attempt_base = attempts, max_attempts = attempts + :max_attempts,
    executed_region = NULL, last_region = NULL, due_at = NULL, failed_at = NULL,
    last_error = NULL, output = NULL, result = NULL, finished_at = NULL,
    lease_token = NULL, lease_expires_at = NULL, leased_by = NULL, leased_at = NULL,
    claimed_from = NULL
WHERE job_id = :job_id
  AND (state = 'dead' OR (:include_cancelled AND state = 'cancelled'))
  AND (:regions IS NULL OR requested_region IN (SELECT value FROM json_each(:regions)))
  AND (:models IS NULL OR model IN (SELECT value FROM json_each(:models)));

-- name: list_attempts
SELECT a.* FROM attempts a JOIN executions e ON e.id = a.execution_id
WHERE e.job_id = :job_id ORDER BY a.execution_id, a.number;

-- name: cancel_job
UPDATE jobs SET cancelled = 1 WHERE id = :job_id AND tenant = :tenant;

-- name: cancel_executions
UPDATE executions SET state = 'cancelled', finished_at = :now
WHERE job_id = :job_id AND state IN ('queued', 'retry_wait');

-- name: job_unfinished
SELECT 1 FROM executions
WHERE job_id = :job_id AND state IN ('queued', 'leased', 'retry_wait') LIMIT 1;

-- name: retries_due
-- Whether claim steps 1 and 2 can find anything (a superset of both: any due failover-any
-- retry, any due retry requested here); when false the claim skips the retry queries.
SELECT EXISTS (SELECT 1 FROM executions
               WHERE state = 'retry_wait' AND failover = 'any' AND due_at <= :now)
    OR EXISTS (SELECT 1 FROM executions
               WHERE state = 'retry_wait' AND requested_region = :region
                 AND due_at <= :now) AS due;

-- name: count_leased
-- The region's seats taken: its leases, and its hedge seats (hedges, race losers running).
SELECT (SELECT count(*) FROM executions WHERE state = 'leased' AND executed_region = :region)
     + (SELECT count(*) FROM hedge_seats WHERE region = :region) AS n;

-- name: global_retries
-- Another region's failures this region may take over, oldest failure first.
SELECT id FROM executions
WHERE state = 'retry_wait' AND failover = 'any' AND due_at <= :now AND last_region <> :region
  AND model IN (SELECT value FROM json_each(:models))
ORDER BY failed_at, id LIMIT :n;

-- name: own_retries
-- Two index range scans (requested here; failed here and free to move), merged.
-- A failover-any retry that failed here comes back only once due for the hand-off
-- delay (:handoff_due = now - retry_handoff_s): other regions get it first.
SELECT id FROM (
    SELECT * FROM (
        SELECT id, due_at FROM executions
        WHERE state = 'retry_wait' AND requested_region = :region AND due_at <= :now
          AND (failover = 'none' OR last_region IS NOT :region OR due_at <= :handoff_due)
          AND model IN (SELECT value FROM json_each(:models))
          AND id NOT IN (SELECT value FROM json_each(:taken))
        ORDER BY due_at, id LIMIT :n)
    UNION ALL
    SELECT * FROM (
        SELECT id, due_at FROM executions
        WHERE state = 'retry_wait' AND last_region = :region AND due_at <= :handoff_due
          AND failover = 'any' AND requested_region <> :region
          AND model IN (SELECT value FROM json_each(:models))
          AND id NOT IN (SELECT value FROM json_each(:taken))
        ORDER BY due_at, id LIMIT :n))
ORDER BY due_at, id LIMIT :n;

-- name: queued_tenants
-- A loose index scan: one index probe per tenant, however long each tenant's queue.
WITH RECURSIVE t(tenant) AS (
    SELECT (SELECT tenant FROM executions
            WHERE state = 'queued' AND requested_region = :region
            ORDER BY tenant LIMIT 1)
    UNION ALL
    SELECT (SELECT e.tenant FROM executions e
            WHERE e.state = 'queued' AND e.requested_region = :region AND e.tenant > t.tenant
            ORDER BY e.tenant LIMIT 1)
    FROM t WHERE t.tenant IS NOT NULL)
SELECT tenant FROM t WHERE tenant IS NOT NULL;

-- name: leased_by_tenant
SELECT tenant, count(*) AS n FROM executions
WHERE state = 'leased' AND executed_region = :region GROUP BY tenant;

-- name: tenant_new_work
SELECT id FROM executions
WHERE state = 'queued' AND requested_region = :region AND tenant = :tenant
  AND model IN (SELECT value FROM json_each(:models))
ORDER BY priority DESC, job_created_at, job_id, question_index, id LIMIT :n;

-- name: lease
-- Every picked execution in one statement (:leases: a JSON array of [id, token, source]),
-- with its job's params.
UPDATE executions
SET state = 'leased', attempts = attempts + 1, lease_token = v.token,
    lease_expires_at = :expires, leased_by = :worker, leased_at = :now,
    executed_region = :region, claimed_from = v.source
FROM (SELECT json_extract(value, '$[0]') AS id, json_extract(value, '$[1]') AS token,
             json_extract(value, '$[2]') AS source
      FROM json_each(:leases)) AS v
WHERE executions.id = v.id
RETURNING id, job_id, tenant, question_index, question, model, requested_region, attempts,
          max_attempts, failover, deferrals, sample, messages, hedges,
          (SELECT params FROM jobs WHERE jobs.id = executions.job_id) AS job_params,
          (SELECT deadline_at FROM jobs WHERE jobs.id = executions.job_id) AS job_deadline_at;

-- name: divert_queued
-- A region whose circuit is open hands its queued failover-any work to the global
-- retry queue: due now, failed "here", no attempt counted (it never ran).
UPDATE executions
SET state = 'retry_wait', due_at = :now, failed_at = :now, last_region = :region
WHERE state = 'queued' AND requested_region = :region AND failover = 'any'
  AND (:model IS NULL OR model = :model);

-- name: heartbeat
-- max(): a heartbeat never shortens a lease that covers its call (rules.seat_lease_s).
UPDATE executions SET lease_expires_at = max(lease_expires_at, :expires)
WHERE id = :id AND lease_token = :token AND state = 'leased';

-- name: complete
UPDATE executions
SET state = 'succeeded', output = :output, result = :result, finished_at = :now,
    lease_expires_at = NULL
WHERE id = :id AND lease_token = :token AND state = 'leased'
RETURNING attempts + deferrals + hedges - (hedged_lease IS lease_token) AS call_number,
          executed_region;

-- name: insert_attempt
INSERT INTO attempts (execution_id, number, region, started_at, finished_at, ok, error)
VALUES (:id, :number, :region, :started_at, :now, :ok, :error);

-- name: lease_of
-- What fail and release decide on (rules.py): the job's cancel flag, where the lease came from.
SELECT j.cancelled, e.claimed_from, e.last_region FROM executions e JOIN jobs j ON j.id = e.job_id
WHERE e.id = :id AND e.lease_token = :token AND e.state = 'leased';

-- name: fail
-- :state, :due_at and :finished_at are rules.after_failure's answer.
UPDATE executions
SET state = :state, due_at = :due_at, failed_at = :now, last_region = executed_region,
    last_error = :error, lease_expires_at = NULL, finished_at = :finished_at
WHERE id = :id AND lease_token = :token AND state = 'leased'
RETURNING attempts + deferrals + hedges - (hedged_lease IS lease_token) AS call_number,
          executed_region;

-- name: defer
-- A deferral (backpressure): logged, but the attempt is given back (pacing.py).
UPDATE executions
SET state = :state, due_at = :due_at, failed_at = :now, last_region = executed_region,
    attempts = attempts - 1, deferrals = deferrals + 1,
    last_error = :error, lease_expires_at = NULL, finished_at = :finished_at
WHERE id = :id AND lease_token = :token AND state = 'leased'
RETURNING attempts + deferrals + hedges - (hedged_lease IS lease_token) AS call_number,
          executed_region;

-- name: release
-- Back to the queue it was claimed from (rules.after_release): the attempt is given back.
UPDATE executions
SET state = :state, finished_at = :finished_at, due_at = :due_at,
    executed_region = :executed_region,
    attempts = attempts - 1, lease_token = NULL, lease_expires_at = NULL,
    leased_by = NULL, leased_at = NULL, claimed_from = NULL
WHERE id = :id AND lease_token = :token AND state = 'leased';

-- name: expired_leases
SELECT e.id, e.job_id, e.attempts, e.deferrals,
       e.hedges - (e.hedged_lease IS e.lease_token) AS hedges, e.max_attempts, e.executed_region,
       e.leased_at,
       j.cancelled
FROM executions e JOIN jobs j ON j.id = e.job_id
WHERE e.state = 'leased' AND e.lease_expires_at < :now
ORDER BY e.id;

-- name: reap_one
-- :state, :due_at and :finished_at are rules.after_lease_expired's answer.
UPDATE executions
SET state = :state, finished_at = :finished_at, due_at = :due_at,
    failed_at = :now, last_region = executed_region, last_error = :error,
    lease_expires_at = NULL
WHERE id = :id;

-- name: set_circuit
INSERT INTO regions (name, circuit, open_until) VALUES (:region, :state, :open_until)
ON CONFLICT (name) DO UPDATE SET circuit = excluded.circuit, open_until = excluded.open_until;

-- name: queue_totals
-- INDEXED BY: without statistics SQLite would count dead rows by scanning a full index.
SELECT (SELECT count(*) FROM executions
        WHERE state = 'retry_wait' AND failover = 'any') AS global_retry,
       (SELECT count(*) FROM executions INDEXED BY executions_dead
        WHERE state = 'dead') AS dead;

-- name: queue_region
SELECT (SELECT count(*) FROM executions
        WHERE state = 'queued' AND requested_region = :region) AS queued,
       (SELECT count(*) FROM executions
        WHERE state = 'retry_wait'
          AND (requested_region = :region OR last_region = :region)) AS retry_wait,
       (SELECT count(*) FROM executions
        WHERE state = 'leased' AND executed_region = :region) AS in_flight,
       coalesce((SELECT circuit FROM regions WHERE name = :region), 'closed') AS circuit,
       (SELECT open_until FROM regions WHERE name = :region) AS open_until;

-- name: leased_by_model
-- A model's calls in flight here: its leases and its hedge seats.
SELECT model, count(*) AS n FROM (
    SELECT model FROM executions WHERE state = 'leased' AND executed_region = :region
    UNION ALL SELECT model FROM hedge_seats WHERE region = :region) AS calls
GROUP BY model;

-- name: pace_insert
-- A (region, model)'s pacing row, created at its first claim (pacing.Pace.initial).
INSERT INTO paces (region, model, max_limit, lim) VALUES (:region, :model, :max_limit, :max_limit)
ON CONFLICT (region, model) DO NOTHING;

-- name: pace_get
SELECT * FROM paces WHERE region = :region AND model = :model;

-- name: claim_paces
-- A claim's pacing rows, every model of the region at once (under the write lock).
SELECT * FROM paces WHERE region = :region AND model IN (SELECT value FROM json_each(:models))
ORDER BY model;

-- name: claim_paces_insert
-- The claim's missing pacing rows (pacing.Pace.initial), created at their first claim.
INSERT INTO paces (region, model, max_limit, lim)
SELECT :region, m.value, l.value, l.value
FROM json_each(:missing) AS m JOIN json_each(:limits) AS l ON l.key = m.key
WHERE true
ON CONFLICT (region, model) DO NOTHING;

-- name: pace_put
UPDATE paces
SET max_limit = :max_limit, lim = :limit, not_before = :not_before, success_run = :success_run,
    decreased_at = :decreased_at, requests = :requests, tokens = :tokens, level_at = :level_at,
    deferrals = :deferrals, circuit = :circuit, circuit_open_until = :circuit_open_until,
    circuit_since = :circuit_since, circuit_error = :circuit_error
WHERE region = :region AND model = :model;

-- name: paces_of_region
SELECT * FROM paces WHERE region = :region ORDER BY model;

-- name: claim_costs
-- What a budgeted claim needs to estimate each candidate's tokens (pacing.estimate_tokens).
SELECT e.id, length(e.question) AS chars, j.params FROM executions e JOIN jobs j ON j.id = e.job_id
WHERE e.id IN (SELECT value FROM json_each(:ids));

-- name: expire_jobs
-- Jobs whose deadline passed: marked once, then their waiting work is made dead.
UPDATE jobs SET expired = 1 WHERE expired = 0 AND deadline_at <= :now RETURNING id;

-- name: expire_executions
-- rules.deadline_error: code deadline_exceeded, the error it replaces kept as "last".
UPDATE executions
SET state = 'dead', finished_at = :now, due_at = NULL,
    last_error = json_object('code', 'deadline_exceeded', 'message', :message,
                             'last', json(last_error))
WHERE job_id IN (SELECT value FROM json_each(:job_ids)) AND state IN ('queued', 'retry_wait');


-- Schedule-to-start (rules.pick step 4) and hedged calls (hedging.py, sql_hedges.py).

-- name: stale_queued
-- Other regions' failover-any work queued since before :stale_before, oldest first.
SELECT id FROM executions
WHERE state = 'queued' AND failover = 'any' AND created_at < :stale_before
  AND requested_region <> :region AND model IN (SELECT value FROM json_each(:models))
ORDER BY created_at, id LIMIT :n;

-- name: hedge_target
-- The lease a hedge races: still current, with what the hedge's claim needs.
SELECT e.id, e.job_id, e.tenant, e.question_index, e.question, e.model, e.requested_region,
       e.attempts, e.max_attempts, e.failover, e.deferrals, e.sample, e.messages, e.hedges,
       e.executed_region, e.lease_expires_at, e.leased_at, j.params, j.deadline_at, j.total
FROM executions e JOIN jobs j ON j.id = e.job_id
WHERE e.id = :id AND e.lease_token = :token AND e.state = 'leased';

-- name: job_hedges
SELECT coalesce(sum(hedges), 0) AS n FROM executions WHERE job_id = :job_id;

-- name: hedge_count
-- One hedge per lease: a lease already hedged is not hedged again.
UPDATE executions SET hedges = hedges + 1, hedged_lease = lease_token
WHERE id = :id AND lease_token = :token AND state = 'leased'
  AND (hedged_lease IS NULL OR hedged_lease <> lease_token)
RETURNING attempts + deferrals + hedges AS call_number, hedges;

-- name: seat_insert
INSERT INTO hedge_seats (token, execution_id, region, model, number, hedge_of, started_at,
                         lease_expires_at)
VALUES (:token, :id, :region, :model, :number, :hedge_of,
        :started_at, :expires);

-- name: seat_get
SELECT * FROM hedge_seats WHERE token = :token AND execution_id = :id;

-- name: seat_delete
DELETE FROM hedge_seats WHERE token = :token AND execution_id = :id
RETURNING number, region;

-- name: complete_hedge
-- The hedge answered first: the execution succeeds with its answer, where it ran.
UPDATE executions
SET state = 'succeeded', output = :output, result = :result, finished_at = :now,
    executed_region = :region, lease_expires_at = NULL
WHERE id = :id AND lease_token = :hedge_of AND state = 'leased';

-- name: seats_expired
-- A seat whose call has surely ended (its deadline passed): the seat is free again.
DELETE FROM hedge_seats WHERE lease_expires_at < :now;
