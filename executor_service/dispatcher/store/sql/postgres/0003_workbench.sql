-- The researcher's workbench: job names, tags and samples; per execution its sample
-- number, its call's chat messages, and where its current round of attempts starts
-- (POST /jobs/<id>/retry gives a dead execution a fresh budget of attempts while its
-- attempt log keeps every earlier one).

ALTER TABLE jobs ADD COLUMN name text;
ALTER TABLE jobs ADD COLUMN tags jsonb NOT NULL DEFAULT '[]';
ALTER TABLE jobs ADD COLUMN samples integer NOT NULL DEFAULT 1;

ALTER TABLE executions ADD COLUMN sample integer NOT NULL DEFAULT 0;
ALTER TABLE executions ADD COLUMN messages jsonb;                -- NULL: the question is the prompt
ALTER TABLE executions ADD COLUMN attempt_base integer NOT NULL DEFAULT 0;

-- GET /jobs reads jobs_tenant_created (tenant, created_at) backwards: no new index.
