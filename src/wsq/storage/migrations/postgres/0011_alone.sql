-- A node alone (issue 11): when no other node holds a live lease, a node marks its row
-- alone and stops publishing its events and holding its inserts (nobody would hear them).
-- A node that starts asks every lone node to stop (alone := NULL) and waits until each
-- has answered (alone := false, once every write it made alone is durable and told) or
-- died. Both steps hold one advisory lock, so a node never turns alone beside a joiner.
-- A node whose lease ran out without its ending it (ended) may be alive and come back
-- (PostgreSQL was out of its reach): for as long as wsq_records keeps records, no node
-- turns alone after such a death ('node_died' in wsq_meta), so that it can read them.
ALTER TABLE wsq_nodes ADD COLUMN alone boolean DEFAULT false;
ALTER TABLE wsq_nodes ADD COLUMN ended boolean NOT NULL DEFAULT false;
