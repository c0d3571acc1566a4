-- The index on seq alone goes: every row version a write makes (an insert, a claim, a
-- finish: each changes an indexed column, so none is a heap-only update) added an entry
-- to it, and it served only listings across every queue and state and the start-up's
-- max(seq), which now read the (state, seq) index four times, once per state, merged.
DROP INDEX IF EXISTS wsq_tasks_seq;
