-- A completed task's last run (Update.attempt): its record in the task's row instead of a
-- row of wsq_attempts, so that a finished task costs one row write, not two (with its
-- primary key entry and the prune). The run and worker are the row's, the outcome is
-- "completed", there is no error; last_ended is NULL unless the row holds such a record.
-- Nullable columns without a default: adding them rewrites no row.
ALTER TABLE wsq_tasks
    ADD COLUMN last_client bytea,
    ADD COLUMN last_node text,
    ADD COLUMN last_offered double precision,
    ADD COLUMN last_started double precision,
    ADD COLUMN last_ended double precision,
    ADD COLUMN last_progress double precision;
