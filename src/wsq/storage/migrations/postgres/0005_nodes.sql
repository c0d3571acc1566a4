-- Node leases: a node renews its row every few seconds; a node whose lease expired is
-- dead, and another takes its active runs over (node = the taker). A task's node is the
-- one holding its active run; the write connection's wsq.node setting fills it on insert.
CREATE TABLE wsq_nodes (
    name text COLLATE "C" PRIMARY KEY,
    instance text NOT NULL,
    expires timestamptz NOT NULL
);
ALTER TABLE wsq_tasks
    ADD COLUMN node text COLLATE "C" DEFAULT nullif(current_setting('wsq.node', true), '');
CREATE INDEX wsq_tasks_active_node ON wsq_tasks (node) WHERE state = 'active';
