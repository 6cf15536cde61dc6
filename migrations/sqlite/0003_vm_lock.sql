-- One active exclusive run per resource (a failover per VM): the key ("vm_id=<id>") is set at submit for
-- definitions with `exclusive_on`, and the unique index makes a second concurrent submit fail
-- in the database, whoever wins the race. A finished run (completed_at set) frees the key.
ALTER TABLE failover_jobs ADD COLUMN lock_key TEXT;
CREATE UNIQUE INDEX failover_jobs_one_active_lock ON failover_jobs (lock_key) WHERE completed_at IS NULL;
