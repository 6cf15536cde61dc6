-- The journal's reference to its run is kept by the statements that write it, not by a
-- foreign key. Every journal row is inserted by the statement that, in the same snapshot,
-- inserted its run or matched it in the checkpoint's compare-and-set (`WHERE run IN (SELECT id
-- FROM cas)`), and runs are never deleted. The key's trigger re-read and share-locked the run
-- row once per journal row (about 13 per workflow): a tenth of PostgreSQL's CPU in the
-- benchmark, and a fifth of its buffer reads. SQLite keeps the key (its check is cheap there).
-- `tern bench` audits every phase for journal rows without a run.
ALTER TABLE journal DROP CONSTRAINT IF EXISTS journal_run_id_fkey;
