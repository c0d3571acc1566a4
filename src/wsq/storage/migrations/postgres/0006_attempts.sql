-- Each task's attempts (RecordAttempt, docs/architecture.md): one row per run that ended,
-- the newest 100 runs of each task (the store prunes as it records), deleted with the task.
-- Keyed by (task, run): a task's history is one index range, and so is pruning it.
-- client and error are UTF-8 bytes, since PostgreSQL text cannot hold the NUL character a
-- client may send.
CREATE TABLE wsq_attempts (
    task text COLLATE "C" NOT NULL,
    run bigint NOT NULL,
    worker text,
    client bytea,
    node text,
    offered double precision,
    started double precision,
    ended double precision NOT NULL,
    outcome text NOT NULL,
    error bytea,
    progress double precision,
    PRIMARY KEY (task, run)
);
