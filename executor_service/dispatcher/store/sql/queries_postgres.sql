-- Named queries of the PostgreSQL store, loaded by name (procrastinate style).
-- Each block starts with "-- name: <name>"; parameters are %(name)s.
-- States are literals (never parameters) so the planner can use the partial indexes.

-- name: insert_job
-- ON CONFLICT waits for a concurrent insert of the same key to commit or abort.
INSERT INTO jobs (id, tenant, idempotency_key, request_hash, failover, max_attempts, priority,
                  questions, models, regions_by_model, params, total, created_at, deadline_at,
                  name, tags, samples)
VALUES (%(id)s, %(tenant)s, %(idempotency_key)s, %(request_hash)s, %(failover)s,
        %(max_attempts)s, %(priority)s, %(questions)s, %(models)s, %(regions_by_model)s,
        %(params)s, %(total)s, %(now)s, %(deadline_at)s, %(name)s, %(tags)s, %(samples)s)
ON CONFLICT (tenant, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
RETURNING *;

-- name: job_by_key
SELECT * FROM jobs WHERE tenant = %(tenant)s AND idempotency_key = %(idempotency_key)s;

-- name: get_job
SELECT * FROM jobs WHERE id = %(id)s AND tenant = %(tenant)s;

-- name: job_counts
SELECT requested_region, state, count(*) AS n FROM executions
WHERE job_id = %(job_id)s GROUP BY requested_region, state;

-- name: list_executions
-- COLLATE "C": the same order as SQLite (code points), whatever the database locale.
SELECT * FROM executions WHERE job_id = %(job_id)s
ORDER BY question_index, model COLLATE "C", requested_region COLLATE "C", id;

-- name: list_executions_page
-- The first page of a job's results (LIMIT NULL: no limit), on the executions_results index.
SELECT * FROM executions WHERE job_id = %(job_id)s
ORDER BY question_index, model COLLATE "C", requested_region COLLATE "C", id
LIMIT %(limit)s;

-- name: list_executions_after
-- The next page: keyset paging after the last key of the previous one.
SELECT * FROM executions
WHERE job_id = %(job_id)s
  AND (question_index, model COLLATE "C", requested_region COLLATE "C", id)
      > (%(after_question)s, %(after_model)s, %(after_region)s, %(after_id)s)
ORDER BY question_index, model COLLATE "C", requested_region COLLATE "C", id
LIMIT %(limit)s;

-- name: list_attempts_of
SELECT * FROM attempts WHERE execution_id = ANY(%(ids)s::bigint[])
ORDER BY execution_id, number;

-- name: list_jobs
-- A page of a tenant's jobs, newest first. The phase filter is the job view's, from
-- the cancel flag and two probes of executions_job: something unfinished, something
-- that is not queued (NULL: either).
SELECT * FROM jobs j
WHERE j.tenant = %(tenant)s
  AND (%(after_created)s::double precision IS NULL OR j.created_at < %(after_created)s
       OR (j.created_at = %(after_created)s AND j.id < %(after_id)s))
  AND (%(name)s::text IS NULL OR strpos(lower(coalesce(j.name, '')), lower(%(name)s)) > 0)
  AND (%(cancelled)s::boolean IS NULL OR j.cancelled = %(cancelled)s)
  AND (%(unfinished)s::boolean IS NULL OR %(unfinished)s = EXISTS (
        SELECT 1 FROM executions e
        WHERE e.job_id = j.id AND e.state IN ('queued', 'leased', 'retry_wait')))
  AND (%(started)s::boolean IS NULL OR %(started)s = EXISTS (
        SELECT 1 FROM executions e WHERE e.job_id = j.id AND e.state <> 'queued'))
ORDER BY j.created_at DESC, j.id DESC LIMIT %(limit)s;

-- name: retry_job
-- The job row first, locked: fail/release/reap lock it too, before an execution row.
SELECT max_attempts FROM jobs WHERE id = %(job_id)s AND tenant = %(tenant)s FOR UPDATE;

-- name: uncancel_job
UPDATE jobs SET cancelled = false WHERE id = %(job_id)s;

-- name: retry_executions
-- Back to the requested region's queue with a fresh budget of attempts.
UPDATE executions
SET state = 'queued', attempt_base = attempts, max_attempts = attempts + %(max_attempts)s,
    executed_region = NULL, last_region = NULL, due_at = NULL, failed_at = NULL,
    last_error = NULL, output = NULL, result = NULL, finished_at = NULL,
    lease_token = NULL, lease_expires_at = NULL, leased_by = NULL, leased_at = NULL,
    claimed_from = NULL
WHERE job_id = %(job_id)s
  AND (state = 'dead' OR (%(include_cancelled)s AND state = 'cancelled'))
  AND (%(regions)s::text[] IS NULL OR requested_region = ANY(%(regions)s::text[]))
  AND (%(models)s::text[] IS NULL OR model = ANY(%(models)s::text[]));

-- name: list_attempts
SELECT a.* FROM attempts a JOIN executions e ON e.id = a.execution_id
WHERE e.job_id = %(job_id)s ORDER BY a.execution_id, a.number;

-- name: cancel_job
-- The job row first: fail/release/reap lock it too, before the execution row.
UPDATE jobs SET cancelled = true WHERE id = %(job_id)s AND tenant = %(tenant)s;

-- name: cancel_executions
UPDATE executions SET state = 'cancelled', finished_at = %(now)s
WHERE job_id = %(job_id)s AND state IN ('queued', 'retry_wait');

-- name: job_unfinished
SELECT 1 FROM executions
WHERE job_id = %(job_id)s AND state IN ('queued', 'leased', 'retry_wait') LIMIT 1;

-- name: lock_region
-- Held until commit: "count the leases, then lease" is atomic across processes.
SELECT pg_advisory_xact_lock(%(namespace)s::integer, hashtext(%(region)s));

-- name: claim_reads_function
-- The claim's reads in one round trip, created on each claim connection when it opens (a
-- temporary function: no migration, nothing left behind). The region's advisory lock first;
-- then each query, in a volatile function at READ COMMITTED, takes a snapshot of its own,
-- after the lock: the lease counts see every lease the lock's previous holder committed.
-- The parts are SQLite's named queries of the same names (sqlite.py runs them one by
-- one): leased_by_model, claim_paces (here locked FOR UPDATE), retries_due (a superset of
-- claim steps 1 and 2: when false the claim skips the retry queries), queued_tenants (a
-- loose index scan, one probe per tenant) and leased_by_tenant.
CREATE OR REPLACE FUNCTION pg_temp.es_claim_reads(
    p_namespace integer, p_region text, p_models text[], p_now double precision)
RETURNS jsonb LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
    leased jsonb; paces jsonb; due boolean; tenants jsonb; by_tenant jsonb;
BEGIN
    PERFORM pg_advisory_xact_lock(p_namespace, hashtext(p_region));
    SELECT coalesce(jsonb_object_agg(l.model, l.n), '{}'::jsonb) INTO leased
    FROM (SELECT model, count(*) AS n FROM (  -- leases and hedge seats (hedging.py)
              SELECT model FROM executions WHERE state = 'leased' AND executed_region = p_region
              UNION ALL SELECT model FROM hedge_seats WHERE region = p_region) AS calls
          GROUP BY model) AS l;
    SELECT coalesce(jsonb_agg(to_jsonb(p) ORDER BY p.model), '[]'::jsonb) INTO paces
    FROM (SELECT * FROM paces WHERE region = p_region AND model = ANY(p_models)
          ORDER BY model FOR UPDATE) AS p;
    SELECT EXISTS (SELECT 1 FROM executions
                   WHERE state = 'retry_wait' AND failover = 'any' AND due_at <= p_now)
        OR EXISTS (SELECT 1 FROM executions
                   WHERE state = 'retry_wait' AND requested_region = p_region
                     AND due_at <= p_now) INTO due;
    WITH RECURSIVE t(tenant) AS (
        SELECT (SELECT tenant FROM executions
                WHERE state = 'queued' AND requested_region = p_region
                ORDER BY tenant LIMIT 1)
        UNION ALL
        SELECT (SELECT e.tenant FROM executions e
                WHERE e.state = 'queued' AND e.requested_region = p_region
                  AND e.tenant > t.tenant
                ORDER BY e.tenant LIMIT 1)
        FROM t WHERE t.tenant IS NOT NULL)
    SELECT coalesce(jsonb_agg(tenant), '[]'::jsonb) INTO tenants FROM t WHERE tenant IS NOT NULL;
    SELECT coalesce(jsonb_object_agg(b.tenant, b.n), '{}'::jsonb) INTO by_tenant
    FROM (SELECT tenant, count(*) AS n FROM executions
          WHERE state = 'leased' AND executed_region = p_region GROUP BY tenant) AS b;
    RETURN jsonb_build_object('leased', leased, 'paces', paces, 'due', due,
                              'tenants', tenants, 'leased_by_tenant', by_tenant);
END
$fn$;

-- name: claim_reads
SELECT pg_temp.es_claim_reads(%(namespace)s::integer, %(region)s, %(models)s::text[],
                              %(now)s::double precision) AS reads;

-- name: count_leased
-- The region's seats taken: its leases, and its hedge seats (hedges, race losers running).
SELECT (SELECT count(*) FROM executions WHERE state = 'leased' AND executed_region = %(region)s)
     + (SELECT count(*) FROM hedge_seats WHERE region = %(region)s) AS n;

-- name: global_retries
-- Another region's failures this region may take over, oldest failure first.
SELECT id FROM executions
WHERE state = 'retry_wait' AND failover = 'any' AND due_at <= %(now)s
  AND last_region <> %(region)s AND model = ANY(%(models)s::text[])
ORDER BY failed_at, id LIMIT %(n)s
FOR UPDATE SKIP LOCKED;

-- name: own_retry_candidates
-- Two index range scans (requested here; failed here and free to move), merged.
-- Not locked here: one OR query with FOR UPDATE lets the planner read every
-- waiting retry of the region (and worse, before statistics exist).
-- A failover-any retry that failed here comes back only once due for the hand-off
-- delay (handoff_due = now - retry_handoff_s): other regions get it first.
SELECT id FROM (
    (SELECT id, due_at FROM executions
     WHERE state = 'retry_wait' AND due_at <= %(now)s AND requested_region = %(region)s
       AND (failover = 'none' OR last_region IS DISTINCT FROM %(region)s
            OR due_at <= %(handoff_due)s)
       AND model = ANY(%(models)s::text[]) AND NOT (id = ANY(%(taken)s::bigint[]))
     ORDER BY due_at, id LIMIT %(n)s)
    UNION ALL
    (SELECT id, due_at FROM executions
     WHERE state = 'retry_wait' AND due_at <= %(handoff_due)s AND failover = 'any'
       AND last_region = %(region)s AND requested_region <> %(region)s
       AND model = ANY(%(models)s::text[]) AND NOT (id = ANY(%(taken)s::bigint[]))
     ORDER BY due_at, id LIMIT %(n)s)) AS candidates
ORDER BY due_at, id LIMIT %(n)s;

-- name: lock_candidates
-- Lock each candidate by primary key, in order, skipping those another claimer holds.
-- The state, due time and hand-off are re-checked on a row changed since it was read
-- (READ COMMITTED), so a retry another region has just taken is skipped, not taken twice.
SELECT c.id FROM unnest(%(candidates)s::bigint[]) WITH ORDINALITY AS c(id, ord)
CROSS JOIN LATERAL (
    SELECT e.id FROM executions e
    WHERE e.id = c.id AND e.state = 'retry_wait' AND e.due_at <= %(now)s
      AND (e.failover = 'none' OR e.last_region IS DISTINCT FROM %(region)s
           OR e.due_at <= %(handoff_due)s)
    FOR UPDATE SKIP LOCKED) AS locked
ORDER BY c.ord;

-- name: tenant_new_work
SELECT id FROM executions
WHERE state = 'queued' AND requested_region = %(region)s AND tenant = %(tenant)s
  AND model = ANY(%(models)s::text[])
ORDER BY priority DESC, job_created_at, job_id, question_index, id LIMIT %(n)s
FOR UPDATE SKIP LOCKED;

-- name: lease
-- The picked rows (locked by the candidate queries) leased, with their job's params.
UPDATE executions AS e
SET state = 'leased', attempts = e.attempts + 1, lease_token = v.token,
    lease_expires_at = %(expires)s, leased_by = %(worker)s, leased_at = %(now)s,
    executed_region = %(region)s, claimed_from = v.source
FROM unnest(%(ids)s::bigint[], %(tokens)s::text[], %(sources)s::text[]) AS v(id, token, source),
     jobs AS j
WHERE e.id = v.id AND j.id = e.job_id
RETURNING e.id, e.job_id, e.tenant, e.question_index, e.question, e.model,
          e.requested_region, e.attempts, e.max_attempts, e.failover, e.deferrals, e.sample,
          e.messages, e.hedges, j.params AS job_params, j.deadline_at AS job_deadline_at;

-- name: divert_queued
-- A region whose circuit is open hands its queued failover-any work to the global
-- retry queue: due now, failed "here", no attempt counted (it never ran). SKIP
-- LOCKED: never waits for a claimer or a cancel holding some of these rows (so no
-- lock-order deadlock with them); a row skipped now is moved by the next divert.
UPDATE executions AS e
SET state = 'retry_wait', due_at = %(now)s, failed_at = %(now)s, last_region = %(region)s
FROM (SELECT id FROM executions
      WHERE state = 'queued' AND requested_region = %(region)s AND failover = 'any'
        AND (%(model)s::text IS NULL OR model = %(model)s::text)
      FOR UPDATE SKIP LOCKED) AS q
WHERE e.id = q.id;

-- name: heartbeat
-- GREATEST: a heartbeat never shortens a lease that covers its call (rules.seat_lease_s).
UPDATE executions AS e SET lease_expires_at = GREATEST(e.lease_expires_at, %(expires)s)
FROM unnest(%(ids)s::bigint[], %(tokens)s::text[]) AS v(id, token)
WHERE e.id = v.id AND e.lease_token = v.token AND e.state = 'leased'
RETURNING e.id;

-- name: complete
UPDATE executions
SET state = 'succeeded', output = %(output)s, result = %(result)s, finished_at = %(now)s,
    lease_expires_at = NULL
WHERE id = %(id)s AND lease_token = %(token)s AND state = 'leased'
RETURNING attempts + deferrals + hedges - (hedged_lease IS NOT DISTINCT FROM lease_token)::int AS call_number,
          executed_region;

-- name: insert_attempt
INSERT INTO attempts (execution_id, number, region, started_at, finished_at, ok, error)
VALUES (%(id)s, %(number)s, %(region)s, %(started_at)s, %(now)s, %(ok)s, %(error)s);

-- name: lease_of
-- What fail and release decide on (rules.py): the job's cancel flag, where the lease came
-- from. FOR SHARE on the job before the execution: a concurrent cancel_job waits, or is
-- waited for.
SELECT j.cancelled, e.claimed_from, e.last_region FROM executions e JOIN jobs j ON j.id = e.job_id
WHERE e.id = %(id)s AND e.lease_token = %(token)s AND e.state = 'leased'
FOR SHARE OF j;

-- name: fail
-- state, due_at and finished_at are rules.after_failure's answer.
UPDATE executions
SET state = %(state)s, due_at = %(due_at)s, failed_at = %(now)s, last_region = executed_region,
    last_error = %(error)s, lease_expires_at = NULL, finished_at = %(finished_at)s
WHERE id = %(id)s AND lease_token = %(token)s AND state = 'leased'
RETURNING attempts + deferrals + hedges - (hedged_lease IS NOT DISTINCT FROM lease_token)::int AS call_number,
          executed_region;

-- name: defer
-- A deferral (backpressure): logged, but the attempt is given back (pacing.py).
UPDATE executions
SET state = %(state)s, due_at = %(due_at)s, failed_at = %(now)s, last_region = executed_region,
    attempts = attempts - 1, deferrals = deferrals + 1,
    last_error = %(error)s, lease_expires_at = NULL, finished_at = %(finished_at)s
WHERE id = %(id)s AND lease_token = %(token)s AND state = 'leased'
RETURNING attempts + deferrals + hedges - (hedged_lease IS NOT DISTINCT FROM lease_token)::int AS call_number,
          executed_region;

-- name: release
-- Back to the queue it was claimed from (rules.after_release): the attempt is given back.
UPDATE executions
SET state = %(state)s, finished_at = %(finished_at)s, due_at = %(due_at)s,
    executed_region = %(executed_region)s,
    attempts = attempts - 1, lease_token = NULL, lease_expires_at = NULL,
    leased_by = NULL, leased_at = NULL, claimed_from = NULL
WHERE id = %(id)s AND lease_token = %(token)s AND state = 'leased';

-- name: expired_jobs
SELECT DISTINCT job_id FROM executions WHERE state = 'leased' AND lease_expires_at < %(now)s;

-- name: lock_jobs
-- Jobs before executions, in a stable order: the lock order cancel_job uses.
SELECT id, cancelled FROM jobs WHERE id = ANY(%(job_ids)s::text[]) ORDER BY id FOR SHARE;

-- name: expired_leases
-- After lock_jobs. SKIP LOCKED: a lease its worker is finishing right now is left to it.
SELECT id, job_id, attempts, deferrals,
       hedges - (hedged_lease IS NOT DISTINCT FROM lease_token)::int AS hedges, max_attempts,
       executed_region, leased_at
FROM executions
WHERE state = 'leased' AND lease_expires_at < %(now)s AND job_id = ANY(%(job_ids)s::text[])
ORDER BY id
FOR UPDATE SKIP LOCKED;

-- name: reap_one
-- state, due_at and finished_at are rules.after_lease_expired's answer.
UPDATE executions
SET state = %(state)s, finished_at = %(finished_at)s, due_at = %(due_at)s,
    failed_at = %(now)s, last_region = executed_region, last_error = %(error)s,
    lease_expires_at = NULL
WHERE id = %(id)s;

-- name: set_circuit
INSERT INTO regions (name, circuit, open_until) VALUES (%(region)s, %(state)s, %(open_until)s)
ON CONFLICT (name) DO UPDATE SET circuit = excluded.circuit, open_until = excluded.open_until;

-- name: queue_totals
SELECT (SELECT count(*) FROM executions
        WHERE state = 'retry_wait' AND failover = 'any') AS global_retry,
       (SELECT count(*) FROM executions WHERE state = 'dead') AS dead;

-- name: queue_regions
SELECT r.name,
       (SELECT count(*) FROM executions
        WHERE state = 'queued' AND requested_region = r.name) AS queued,
       (SELECT count(*) FROM executions
        WHERE state = 'retry_wait'
          AND (requested_region = r.name OR last_region = r.name)) AS retry_wait,
       (SELECT count(*) FROM executions
        WHERE state = 'leased' AND executed_region = r.name) AS in_flight,
       coalesce(c.circuit, 'closed') AS circuit, c.open_until
FROM unnest(%(regions)s::text[]) AS r(name) LEFT JOIN regions c ON c.name = r.name;

-- name: leased_by_model
-- A model's calls in flight here: its leases and its hedge seats.
SELECT model, count(*) AS n FROM (
    SELECT model FROM executions WHERE state = 'leased' AND executed_region = %(region)s
    UNION ALL SELECT model FROM hedge_seats WHERE region = %(region)s) AS calls
GROUP BY model;

-- name: pace_insert
-- A (region, model)'s pacing row, created at its first claim (pacing.Pace.initial).
INSERT INTO paces (region, model, max_limit, lim) VALUES (%(region)s, %(model)s, %(max_limit)s, %(max_limit)s)
ON CONFLICT (region, model) DO NOTHING;

-- name: pace_get
SELECT * FROM paces WHERE region = %(region)s AND model = %(model)s FOR UPDATE;

-- name: claim_paces
-- A claim's pacing rows, every model of the region at once, locked until commit.
SELECT * FROM paces WHERE region = %(region)s AND model = ANY(%(models)s::text[])
ORDER BY model FOR UPDATE;

-- name: claim_paces_insert
-- The claim's missing pacing rows (pacing.Pace.initial), created at their first claim.
INSERT INTO paces (region, model, max_limit, lim)
SELECT %(region)s, v.model, v.max_limit, v.max_limit
FROM unnest(%(missing)s::text[], %(limits)s::integer[]) AS v(model, max_limit)
ON CONFLICT (region, model) DO NOTHING;

-- name: pace_put
UPDATE paces
SET max_limit = %(max_limit)s, lim = %(limit)s, not_before = %(not_before)s, success_run = %(success_run)s,
    decreased_at = %(decreased_at)s, requests = %(requests)s, tokens = %(tokens)s, level_at = %(level_at)s,
    deferrals = %(deferrals)s, circuit = %(circuit)s, circuit_open_until = %(circuit_open_until)s,
    circuit_since = %(circuit_since)s, circuit_error = %(circuit_error)s
WHERE region = %(region)s AND model = %(model)s;

-- name: paces_of_region
SELECT * FROM paces WHERE region = %(region)s ORDER BY model;

-- name: claim_costs
-- What a budgeted claim needs to estimate each candidate's tokens (pacing.estimate_tokens).
SELECT e.id, length(e.question) AS chars, j.params FROM executions e JOIN jobs j ON j.id = e.job_id
WHERE e.id = ANY(%(ids)s::bigint[]);

-- name: expire_jobs
-- Jobs whose deadline passed: marked once (the job row first: the lock order of cancel),
-- then their waiting work is made dead.
UPDATE jobs SET expired = true WHERE NOT expired AND deadline_at <= %(now)s RETURNING id;

-- name: expire_executions
-- rules.deadline_error: code deadline_exceeded, the error it replaces kept as "last".
UPDATE executions
SET state = 'dead', finished_at = %(now)s, due_at = NULL,
    last_error = jsonb_build_object('code', 'deadline_exceeded', 'message', %(message)s::text,
                                    'last', last_error)
WHERE job_id = ANY(%(job_ids)s::text[]) AND state IN ('queued', 'retry_wait');


-- Schedule-to-start (rules.pick step 4) and hedged calls (hedging.py, sql_hedges.py).

-- name: stale_queued
-- Other regions' failover-any work queued since before :stale_before, oldest first.
SELECT id FROM executions
WHERE state = 'queued' AND failover = 'any' AND created_at < %(stale_before)s
  AND requested_region <> %(region)s AND model = ANY(%(models)s::text[])
ORDER BY created_at, id LIMIT %(n)s
FOR UPDATE SKIP LOCKED;

-- name: hedge_target
-- The lease a hedge races: still current, with what the hedge's claim needs.
SELECT e.id, e.job_id, e.tenant, e.question_index, e.question, e.model, e.requested_region,
       e.attempts, e.max_attempts, e.failover, e.deferrals, e.sample, e.messages, e.hedges,
       e.executed_region, e.lease_expires_at, e.leased_at, j.params, j.deadline_at, j.total
FROM executions e JOIN jobs j ON j.id = e.job_id
WHERE e.id = %(id)s AND e.lease_token = %(token)s AND e.state = 'leased'
FOR UPDATE OF e;

-- name: job_hedges
SELECT coalesce(sum(hedges), 0) AS n FROM executions WHERE job_id = %(job_id)s;

-- name: hedge_count
-- One hedge per lease: a lease already hedged is not hedged again.
UPDATE executions SET hedges = hedges + 1, hedged_lease = lease_token
WHERE id = %(id)s AND lease_token = %(token)s AND state = 'leased'
  AND (hedged_lease IS NULL OR hedged_lease <> lease_token)
RETURNING attempts + deferrals + hedges AS call_number, hedges;

-- name: seat_insert
INSERT INTO hedge_seats (token, execution_id, region, model, number, hedge_of, started_at,
                         lease_expires_at)
VALUES (%(token)s, %(id)s, %(region)s, %(model)s, %(number)s, %(hedge_of)s,
        %(started_at)s, %(expires)s);

-- name: seat_get
SELECT * FROM hedge_seats WHERE token = %(token)s AND execution_id = %(id)s
FOR UPDATE;

-- name: seat_delete
DELETE FROM hedge_seats WHERE token = %(token)s AND execution_id = %(id)s
RETURNING number, region;

-- name: complete_hedge
-- The hedge answered first: the execution succeeds with its answer, where it ran.
UPDATE executions
SET state = 'succeeded', output = %(output)s, result = %(result)s, finished_at = %(now)s,
    executed_region = %(region)s, lease_expires_at = NULL
WHERE id = %(id)s AND lease_token = %(hedge_of)s AND state = 'leased';

-- name: seats_expired
-- A seat whose call has surely ended (its deadline passed): the seat is free again.
DELETE FROM hedge_seats WHERE lease_expires_at < %(now)s;
