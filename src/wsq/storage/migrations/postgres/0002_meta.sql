-- The store's identity, made once: a blob store records which state store it serves, so
-- two servers with separate databases cannot share (and sweep) one blob store. md5 of
-- randomness rather than gen_random_uuid(), which older PostgreSQL lacks.
CREATE TABLE wsq_meta (
    key text COLLATE "C" PRIMARY KEY,
    value text NOT NULL
);
INSERT INTO wsq_meta (key, value)
VALUES ('store_id', md5(random()::text || clock_timestamp()::text || pg_backend_pid()::text));
