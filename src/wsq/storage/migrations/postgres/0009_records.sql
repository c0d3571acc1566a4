-- The records each batch publishes for the other nodes (Publish), kept a few minutes: a
-- node whose listening connection broke reads those committed meanwhile once it listens
-- again, so none is lost to it. NOTIFY still carries each record (with its id) as it
-- commits; nodes delete the rows older than a few minutes with their heartbeats.
CREATE TABLE wsq_records (
    id bigserial PRIMARY KEY,
    at timestamptz NOT NULL DEFAULT now(),
    record text NOT NULL
);
CREATE INDEX wsq_records_at ON wsq_records (at);
