-- Results paged by key (issue 10, item 7): a page of GET /jobs/<id>/results is a range
-- of this index after the previous page's last key, in the results order (code points,
-- as SQLite compares), so reading a job of N executions page by page reads N rows, not
-- N^2 / page as OFFSET did.
CREATE INDEX executions_results
    ON executions (job_id, question_index, model COLLATE "C", requested_region COLLATE "C", id);
