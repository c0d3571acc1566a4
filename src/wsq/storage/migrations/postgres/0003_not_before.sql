-- When a waiting task may be claimed (ClaimWaiting): the end of a back-off after a run
-- that timed out, so that no node claims it before then. 0: at once. Adding a column
-- with a constant default rewrites no rows (PostgreSQL 11 and later).
ALTER TABLE wsq_tasks ADD COLUMN not_before float8 NOT NULL DEFAULT 0;
