-- Uploads in progress (issue 11): a node records the key of each blob it starts to write,
-- before any byte reaches the blob store, as a row of wsq_blobs with no task, its node and
-- the instance (lease) of that node. The add's insert gives the row its task. The rows of
-- a node whose lease ran out are marked swept (their blobs are then deleted, and unfinished
-- uploads aborted); an insert that finds its blob's row swept or gone fails, so no task can
-- reference a blob that was swept. Swept rows are kept a day, then deleted.
ALTER TABLE wsq_blobs ALTER COLUMN task DROP NOT NULL;
ALTER TABLE wsq_blobs
    ADD COLUMN node text COLLATE "C",
    ADD COLUMN instance text COLLATE "C",
    ADD COLUMN since timestamptz,
    ADD COLUMN swept boolean NOT NULL DEFAULT false;
CREATE INDEX wsq_blobs_uploads ON wsq_blobs (node) WHERE task IS NULL;

-- Raises $2 with SQLSTATE $1 (for conditions a statement checks in a CTE).
CREATE FUNCTION wsq_fail(code text, message text) RETURNS integer
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION USING ERRCODE = code, MESSAGE = message;
END
$$;
