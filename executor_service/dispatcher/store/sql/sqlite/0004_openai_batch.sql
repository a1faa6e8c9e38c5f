-- OpenAI Batch API objects (dispatcher/openai_batch.py): uploaded files and batches, by
-- tenant. A batch's own state is its JSON body; its requests are ordinary jobs.
-- Also the answers reusable by identical calls (dispatcher/reuse.py), kind 'call'.
CREATE TABLE openai_objects (
    kind        TEXT NOT NULL CHECK (kind IN ('file', 'batch', 'call')),
    id          TEXT NOT NULL,
    tenant      TEXT NOT NULL,
    created_at  REAL NOT NULL,
    body        TEXT NOT NULL,                    -- JSON object
    content     BLOB,                             -- a file's bytes
    PRIMARY KEY (kind, id)
);

CREATE INDEX openai_objects_tenant ON openai_objects (tenant, kind, created_at);
