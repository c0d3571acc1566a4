-- Each live node's index (1-1023), the low bits of the seqs it makes: two nodes adding in
-- the same microsecond still make different seqs. 0 stays for nodes of an older wsq that
-- do not take one. A dead node's row is deleted by the node that takes it over, which
-- frees its index.
ALTER TABLE wsq_nodes ADD COLUMN idx smallint;
CREATE UNIQUE INDEX wsq_nodes_idx ON wsq_nodes (idx);
