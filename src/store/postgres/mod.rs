//! PostgreSQL backend: many workers on many machines. Claims use `FOR UPDATE SKIP LOCKED`;
//! submits, signals and cancels `pg_notify` a channel that every process LISTENs on, so a
//! worker anywhere wakes within milliseconds (polling remains the fallback).

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions, PgRow};
use sqlx::types::Json;
use sqlx::{PgPool, Row};
use uuid::Uuid;

use super::shared::{run_from_row, Cols, RUN_COLUMNS};
use super::*;

mod peers;
mod writer;

use crate::store::group::{WriteJob, MAX_BATCH};
use peers::{share_commits, writers_of_schema, LINGER, WRITERS};

pub struct PgStore {
    pool: PgPool,
    wakeup: Arc<Wakeup>,
    channel: String,
    listener: tokio::task::JoinHandle<()>,
    /// Checkpoints and submits go through the group-commit writer.
    writer: tokio::sync::mpsc::Sender<WriteJob>,
    /// This process's share of the writer loops (see [`WRITERS`]).
    commit_loops: tokio::sync::watch::Receiver<usize>,
    /// The writer loops' queue.
    queue: Arc<crate::store::group::SharedQueue>,
}

impl Drop for PgStore {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

impl PgStore {
    /// Connects, applies migrations and starts LISTENing. `schema` (created if missing) isolates
    /// a store inside one database, which is how tests share the one PostgreSQL server.
    pub async fn connect(url: &str, schema: Option<&str>) -> Result<PgStore> {
        let mut opts =
            PgConnectOptions::from_str(url).map_err(|e| StoreError::Config(format!("{}: {e}", redact_url(url))))?;
        if let Some(schema) = schema {
            if !schema.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(StoreError::Config(format!(
                    "schema name {schema:?} must be [A-Za-z0-9_]"
                )));
            }
            let admin = PgPoolOptions::new()
                .max_connections(1)
                .connect_with(opts.clone())
                .await?;
            sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS {schema}"))
                .execute(&admin)
                .await?;
            admin.close().await;
            opts = opts.options([("search_path", schema)]);
        }
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(60))
            .connect_with(opts.clone())
            .await?;
        // Serialise concurrent migrations from several processes starting at once.
        let mut conn = pool.acquire().await?;
        sqlx::query("SELECT pg_advisory_lock(7301)").execute(&mut *conn).await?;
        let migrated = sqlx::migrate!("migrations/postgres").run(&mut *conn).await;
        sqlx::query("SELECT pg_advisory_unlock(7301)")
            .execute(&mut *conn)
            .await?;
        drop(conn);
        migrated?;
        let channel = format!("tern_wakeup_{}", schema.unwrap_or("public"));
        let wakeup = Arc::new(Wakeup::default());
        let listener = tokio::spawn(listen(pool.clone(), channel.clone(), wakeup.clone()));
        let (writer, jobs) = tokio::sync::mpsc::channel(4 * MAX_BATCH);
        // The writer's connections of their own. Its statements reach rows by key only, and a
        // plan a connection caches is kept: one made while a table was young (or never
        // analyzed, with autovacuum off) chose to scan `runs` whole and hash it, and went on
        // scanning it at every batch as it grew. With sequential scans off, these connections
        // always go by index, whatever the statistics say.
        // Each process's writer connections carry the same name, unique to the process, so
        // that every process can count those writing to its schema (see `WRITERS`).
        let writers_of_schema = writers_of_schema(schema.unwrap_or("public"));
        let writer_name = format!("{writers_of_schema}{}", &Uuid::new_v4().simple().to_string()[..12]);
        let writer_pool = PgPoolOptions::new()
            .max_connections(2 * WRITERS as u32)
            // Always one open, so that the other processes count this one.
            .min_connections(1)
            .acquire_timeout(Duration::from_secs(60))
            .after_connect(|conn, _| {
                Box::pin(async move {
                    sqlx::query("SET enable_seqscan = off").execute(conn).await?;
                    Ok(())
                })
            })
            .connect_with(opts.application_name(&writer_name))
            .await?;
        let committer = Arc::new(writer::PgCommitter {
            pool: writer_pool,
            channel: channel.clone(),
        });
        let (active, commit_loops) = tokio::sync::watch::channel(WRITERS);
        let jobs = crate::store::group::SharedQueue::new(jobs, LINGER, WRITERS, Some(commit_loops.clone()));
        for index in 0..WRITERS {
            tokio::spawn(crate::store::group::group_writer(
                committer.clone(),
                jobs.clone(),
                index,
            ));
        }
        tokio::spawn(share_commits(
            pool.clone(),
            writers_of_schema,
            active,
            writer.downgrade(),
        ));
        Ok(PgStore {
            pool,
            wakeup,
            channel,
            listener,
            writer,
            commit_loops,
            queue: jobs,
        })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The writer loops of this process that may commit at once: its share of `WRITERS`
    /// among the processes writing to the same schema.
    pub fn commit_loops(&self) -> usize {
        *self.commit_loops.borrow()
    }

    /// Queues a job for the group-commit writer and waits until its batch committed.
    async fn write<T>(&self, job: impl FnOnce(tokio::sync::oneshot::Sender<Result<T>>) -> WriteJob) -> Result<T> {
        let stopped = || StoreError::WriterStopped;
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.writer.send(job(reply)).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    /// A read that decides a write locks its row.
    const FOR_UPDATE: &'static str = " FOR UPDATE";
    const LEAST: &'static str = "LEAST";

    /// Tells every process LISTENing on this schema's channel, at commit.
    async fn notify(&self, tx: &mut sqlx::PgConnection) -> Result<()> {
        sqlx::query("SELECT pg_notify($1, '')")
            .bind(&self.channel)
            .execute(&mut *tx)
            .await?;
        Ok(())
    }
}

/// Forwards NOTIFYs to the in-process wake-up; reconnects after errors (polling covers the gap).
async fn listen(pool: PgPool, channel: String, wakeup: Arc<Wakeup>) {
    loop {
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "LISTEN connection failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if let Err(e) = listener.listen(&channel).await {
            tracing::warn!(error = %e, "LISTEN failed; retrying");
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        loop {
            match listener.recv().await {
                Ok(_) => wakeup.wake(),
                Err(e) => {
                    tracing::warn!(error = %e, "LISTEN connection lost; reconnecting");
                    wakeup.wake();
                    break;
                }
            }
        }
    }
}

/// PostgreSQL has uuid, jsonb and boolean columns.
impl Cols for PgRow {
    fn text(&self, col: &str) -> Result<Option<String>> {
        Ok(self.try_get(col)?)
    }
    fn int(&self, col: &str) -> Result<Option<i64>> {
        Ok(self.try_get(col)?)
    }
    fn flag(&self, col: &str) -> Result<bool> {
        Ok(self.try_get(col)?)
    }
    fn doc(&self, col: &str) -> Result<Value> {
        Ok(self.try_get::<Json<Value>, _>(col)?.0)
    }
    fn run_id(&self, col: &str) -> Result<RunId> {
        Ok(RunId(self.try_get(col)?))
    }
}

impl PgStore {
    async fn claim_due(
        &self,
        owner: &str,
        limit: u32,
        lease_ttl: Duration,
        now: Timestamp,
    ) -> Result<Vec<(RunRow, Lease)>> {
        let cols = RUN_COLUMNS
            .split(", ")
            .map(|c| format!("r.{}", c.trim()))
            .collect::<Vec<_>>()
            .join(", ");
        let rows = sqlx::query(&format!(
            "WITH due AS (SELECT id FROM runs WHERE wake_at IS NOT NULL AND wake_at <= $3 \
                          AND (lease_expires_at IS NULL OR lease_expires_at < $3) \
                          ORDER BY wake_at LIMIT $4 FOR UPDATE SKIP LOCKED) \
             UPDATE runs r SET lease_owner = $1, lease_expires_at = $2, fencing_token = r.fencing_token + 1 \
             FROM due WHERE r.id = due.id RETURNING {cols}"
        ))
        .bind(owner)
        .bind(now.plus(lease_ttl).0)
        .bind(now.0)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let run = run_from_row(r)?;
                let lease = Lease {
                    owner: owner.to_string(),
                    token: run.fencing_token,
                };
                Ok((run, lease))
            })
            .collect()
    }

    async fn renew_lease(&self, run: RunId, lease: &Lease, expires_at: Timestamp) -> Result<()> {
        let r = sqlx::query(
            "UPDATE runs SET lease_expires_at = $1 WHERE id = $2 AND lease_owner = $3 AND fencing_token = $4",
        )
        .bind(expires_at.0)
        .bind(run.0)
        .bind(&lease.owner)
        .bind(lease.token)
        .execute(&self.pool)
        .await?;
        if r.rows_affected() == 0 {
            return Err(StoreError::Fenced { run });
        }
        Ok(())
    }

    async fn drop_lease(&self, run: RunId, lease: &Lease) -> Result<()> {
        sqlx::query(
            "UPDATE runs SET lease_owner = NULL, lease_expires_at = NULL WHERE id = $1 AND lease_owner = $2 AND fencing_token = $3",
        )
        .bind(run.0)
        .bind(&lease.owner)
        .bind(lease.token)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    fn count_executing(&self, count: Option<crate::store::ExecutingCount>) {
        self.queue.set_executing_count(count);
    }
}

impl PgStore {
    async fn list_runs_sql(&self, f: &RunFilter) -> Result<Vec<RunRow>> {
        let rows = sqlx::query(&format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE ($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR definition = $2) \
             AND ($3::uuid IS NULL OR id < $3) ORDER BY id DESC LIMIT $4"
        ))
        .bind(f.status.map(RunStatus::as_str))
        .bind(&f.definition)
        .bind(f.before.map(|b| b.0))
        .bind(f.limit.max(1) as i64)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(run_from_row).collect()
    }

    async fn durability_settings(&self) -> Result<String> {
        let fsync: String = sqlx::query_scalar("SHOW fsync").fetch_one(&self.pool).await?;
        let sc: String = sqlx::query_scalar("SHOW synchronous_commit")
            .fetch_one(&self.pool)
            .await?;
        // Not durability, but it decides how a long run ages: without autovacuum, dead rows pile up.
        let av: String = sqlx::query_scalar("SHOW autovacuum").fetch_one(&self.pool).await?;
        Ok(format!("fsync={fsync} synchronous_commit={sc} autovacuum={av}"))
    }

    /// A run id as this backend binds it.
    fn key(run: RunId) -> Uuid {
        run.0
    }

    async fn list_jobs(&self, f: &JobFilter) -> Result<Vec<FailoverJobRow>> {
        // Only the filters given, so each query walks an index in (filter, job_id) order and
        // stops at the page size (keyset pagination, newest first; job_id is the run id).
        let mut clauses: Vec<String> = Vec::new();
        let mut binds: Vec<String> = Vec::new();
        for (column, value) in [
            ("f.status = ", f.status.clone()),
            ("f.job_type = ", f.job_type.clone()),
            ("f.vm_id = ", f.vm_id.clone()),
            ("f.job_id < ", f.before.map(|b| b.to_string())),
        ] {
            if let Some(v) = value {
                binds.push(v);
                clauses.push(format!("{column}${}", binds.len()));
            }
        }
        let defs = !f.definitions.is_empty();
        if defs {
            clauses.push(format!("r.definition = ANY(${}::text[])", binds.len() + 1));
        }
        let filter = match clauses.is_empty() {
            true => String::new(),
            false => format!("WHERE {}", clauses.join(" AND ")),
        };
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM failover_jobs f JOIN runs r ON r.id = f.job_id::uuid {filter} \
             ORDER BY f.job_id DESC LIMIT {}",
            f.limit.max(1)
        );
        let mut q = sqlx::query(&sql);
        for v in binds {
            q = q.bind(v);
        }
        if defs {
            q = q.bind(&f.definitions);
        }
        let rows = q.fetch_all(&self.pool).await?;
        rows.iter().map(job_from_row).collect()
    }

    async fn begin_write(&self) -> Result<sqlx::Transaction<'_, sqlx::Postgres>> {
        Ok(self.pool.begin().await?)
    }
}

super::shared::inventory_and_jobs!(PgStore, PgRow);
super::shared::run_reads!(PgStore);
super::diagnostics::diagnostics!(PgStore);
super::shared::run_writes!(PgStore, "postgres");

const JOB_COLUMNS: &str = "f.job_id, f.vm_id, f.vm_name, f.job_type, f.status, f.linstor_snapshot_name, \
    f.destination_vm_id, f.network_mappings, f.error_message, f.correlation_id, f.created_at::text AS created_at, \
    f.started_at::text AS started_at, f.completed_at::text AS completed_at";

/// A unique violation of the insert that carries `lock_key` is the lock being held.
fn lock_conflict(e: sqlx::Error, key: &Option<String>) -> StoreError {
    match (&e, key) {
        (sqlx::Error::Database(d), Some(key)) if d.is_unique_violation() => StoreError::Conflict { key: key.clone() },
        _ => StoreError::Database(e),
    }
}
