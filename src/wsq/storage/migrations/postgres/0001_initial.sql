-- wsq's state in PostgreSQL, version 1 (wsq.storage.postgres runs this once, under an
-- advisory lock, and records it in wsq_schema_version).
--
-- One row per task, keyed by id. The core allocates seq; (queue, state, seq) serves
-- LoadWaiting, listings of a queue and, later, claiming waiting tasks in order; (state, seq)
-- serves recovery's active tasks and listings by state; (seq) the other listings and
-- max(seq). id and queue compare byte-wise (COLLATE "C"), as SQLite's do.
--
-- streams is the JSON array of every StreamRef (NULL when none); blob_streams the JSON
-- array of those held in blobs only (NULL when none): what a stripped task keeps. error
-- is UTF-8 bytes, since PostgreSQL text cannot hold the NUL character a worker may send.
CREATE TABLE wsq_tasks (
    id text COLLATE "C" PRIMARY KEY,
    queue text COLLATE "C" NOT NULL,
    state text NOT NULL CHECK (state IN ('waiting', 'active', 'completed', 'failed')),
    seq bigint NOT NULL,
    data bytea NOT NULL,
    streams text,
    blob_streams text,
    opt_timeout double precision NOT NULL,
    opt_retries bigint NOT NULL,
    opt_autoremove boolean NOT NULL,
    progress double precision NOT NULL,
    retries bigint NOT NULL,
    error bytea,
    run bigint NOT NULL,
    worker text,
    created double precision NOT NULL,
    updated double precision NOT NULL,
    owner text
);
CREATE INDEX wsq_tasks_queue_state_seq ON wsq_tasks (queue, state, seq);
CREATE INDEX wsq_tasks_state_seq ON wsq_tasks (state, seq);
CREATE INDEX wsq_tasks_seq ON wsq_tasks (seq);

-- The blobs each task references (for deletes and the orphan sweep).
CREATE TABLE wsq_blobs (
    key text COLLATE "C" PRIMARY KEY,
    task text COLLATE "C" NOT NULL
);
CREATE INDEX wsq_blobs_task ON wsq_blobs (task);
