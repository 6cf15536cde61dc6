-- A run that needs an operator keeps its VM until an operator resolves it (`tern resolve`):
-- a run clears its key when it gives the VM up (it finished on its own, or was resolved), and
-- the index holds the keys still set. Runs that ended before this migration give theirs up,
-- needs_operator ones included: locking them now could collide with a later run of the VM.
DROP INDEX failover_jobs_one_active_lock;
UPDATE failover_jobs SET lock_key = NULL WHERE completed_at IS NOT NULL;
CREATE UNIQUE INDEX failover_jobs_one_active_lock ON failover_jobs (lock_key) WHERE lock_key IS NOT NULL;
