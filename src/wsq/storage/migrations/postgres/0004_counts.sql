-- Tasks per queue and state, kept by the statements that move them: each node adds its
-- moves to rows of its own (node = its --node-name), so nodes never wait for each
-- other's locks here, and the counts are the sums over nodes. Read by stats and at start
-- instead of counting every task. The rows of node '' hold the counts this migration
-- found.
CREATE TABLE wsq_counts (
    node text COLLATE "C" NOT NULL,
    queue text COLLATE "C" NOT NULL,
    state text NOT NULL,
    n bigint NOT NULL,
    PRIMARY KEY (node, queue, state)
);
INSERT INTO wsq_counts (node, queue, state, n)
SELECT '', queue, state, count(*) FROM wsq_tasks GROUP BY queue, state;
