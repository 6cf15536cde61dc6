-- ListFailovers filters by status, job type or VM and pages newest first on job_id (the run
-- id): one index per filter in (filter, job_id) order lets a page stop after its rows. The
-- single-column indexes they replace are prefixes of them.
CREATE INDEX failover_jobs_status_job ON failover_jobs (status, job_id);
CREATE INDEX failover_jobs_type_job ON failover_jobs (job_type, job_id);
CREATE INDEX failover_jobs_vm_job ON failover_jobs (vm_id, job_id);
DROP INDEX failover_jobs_status;
DROP INDEX failover_jobs_vm;
