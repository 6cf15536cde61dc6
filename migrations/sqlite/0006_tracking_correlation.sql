-- job_tracking rows carry their run's correlation id, as the seeds' rows do (they are looked
-- up by it). Rows written before get theirs from the run.
ALTER TABLE job_tracking ADD COLUMN correlation_id TEXT;
UPDATE job_tracking SET correlation_id = (SELECT r.correlation_id FROM runs r WHERE r.id = job_tracking.parent_job_id);
CREATE INDEX job_tracking_correlation ON job_tracking (correlation_id);
