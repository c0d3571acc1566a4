-- The workers registered on each node, for the other nodes' stats and workers listings.
-- A node writes its rows as its workers come and go (PutWorker, DropWorkers); holder is
-- the node's lease name (the write connection's wsq.node), so that the rows of a dead
-- node are deleted by the node that takes its runs over, and listings show only the rows
-- of live leases. node is the name it shows (--node-name).
CREATE TABLE wsq_workers (
    node text COLLATE "C" NOT NULL,
    key text COLLATE "C" NOT NULL,
    holder text COLLATE "C" NOT NULL
        DEFAULT nullif(current_setting('wsq.node', true), ''),
    name text NOT NULL,
    queue text COLLATE "C" NOT NULL,
    concurrency integer NOT NULL,
    since double precision NOT NULL,
    client bytea, -- what the hello said, which may hold NUL
    peer text,
    PRIMARY KEY (node, key)
);
CREATE INDEX wsq_workers_holder ON wsq_workers (holder);
