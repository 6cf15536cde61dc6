//! SQLite backend: the embedded default. WAL with `synchronous=FULL`, so a committed checkpoint
//! survives power loss. Write transactions start with `BEGIN IMMEDIATE` so two writers queue on
//! the busy timeout instead of failing on a lock upgrade.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous};
use sqlx::types::Json;
use sqlx::{Row, SqlitePool};
use tokio::sync::{mpsc, oneshot};

use super::shared::{doc_of_text, run_from_row, run_id_of_text, Cols, RUN_COLUMNS};
use super::*;

mod writer;
use crate::store::group::{ClaimJob, LeaseJob, WriteJob, MAX_BATCH};

pub struct SqliteStore {
    pool: SqlitePool,
    wakeup: Arc<Wakeup>,
    /// Checkpoints go through the group-commit writer.
    writer: mpsc::Sender<WriteJob>,
}

/// How long a write waits for another connection's transaction before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// Turns off SQLite's memory statistics, once per process and before its first connection.
/// With them on, every allocation SQLite makes takes a process-wide mutex to count itself; the
/// writer thread and the readers then share that lock, and nothing here reads the counts (no
/// `sqlite3_memory_used`, no soft heap limit). Counted with callgrind on the same bench
/// (`--backend sqlite --runs 400 --in-flight 20`): 1.505-1.508 billion instructions against
/// 1.558-1.576, mutex lock and unlock taking 0.7 and 0.9% of them against 1.8 and 2.3%.
fn without_memory_statistics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: `sqlite3_config` must run before SQLite initializes and while no other thread
        // is inside SQLite. Every connection of this process is opened through
        // `SqliteStore::connect`, which calls this first, or after a store was opened (the
        // bench's seeding pool), and `Once` makes concurrent callers wait for it. Should SQLite be initialized already (a connection opened elsewhere), the call
        // changes nothing and returns SQLITE_MISUSE. The one variadic argument is the C int the
        // option takes.
        let rc = unsafe {
            rusqlite::ffi::sqlite3_config(rusqlite::ffi::SQLITE_CONFIG_MEMSTATUS, std::ffi::c_int::from(0u8))
        };
        if rc != rusqlite::ffi::SQLITE_OK {
            tracing::debug!(rc, "SQLite was initialized already: its memory statistics stay on");
        }
    });
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `url` and applies migrations.
    pub async fn connect(url: &str) -> Result<SqliteStore> {
        without_memory_statistics();
        if url.contains(":memory:") || url.contains("mode=memory") {
            return Err(StoreError::Config(format!(
                "{}: an in-memory SQLite database is not supported (the writer has a connection of its own); \
                 give a file, e.g. sqlite://tern.db",
                redact_url(url)
            )));
        }
        let opts = SqliteConnectOptions::from_str(url)
            .map_err(|e| StoreError::Config(format!("{}: {e}", redact_url(url))))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(60))
            .connect_with(opts.clone())
            .await?;
        sqlx::migrate!("migrations/sqlite").run(&pool).await?;
        let (writer, jobs) = mpsc::channel(4 * MAX_BATCH);
        writer::spawn(opts.get_filename(), jobs)?;
        Ok(SqliteStore {
            pool,
            wakeup: Arc::new(Wakeup::default()),
            writer,
        })
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Queues a job for the group-commit writer and waits until its batch committed.
    async fn write<T>(&self, job: impl FnOnce(oneshot::Sender<Result<T>>) -> WriteJob) -> Result<T> {
        let stopped = || StoreError::WriterStopped;
        let (reply, answer) = oneshot::channel();
        self.writer.send(job(reply)).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

/// SQLite stores run ids, JSON and flags as text and integers.
macro_rules! sqlite_cols {
    ($row:ty, $get:ident) => {
        impl Cols for $row {
            fn text(&self, col: &str) -> Result<Option<String>> {
                Ok(self.$get(col)?)
            }
            fn int(&self, col: &str) -> Result<Option<i64>> {
                Ok(self.$get(col)?)
            }
            fn flag(&self, col: &str) -> Result<bool> {
                Ok(self.int(col)?.unwrap_or(0) != 0)
            }
            fn doc(&self, col: &str) -> Result<Value> {
                doc_of_text(col, self.text(col)?)
            }
            fn run_id(&self, col: &str) -> Result<RunId> {
                run_id_of_text(col, self.text(col)?)
            }
        }
    };
}

sqlite_cols!(SqliteRow, try_get);
sqlite_cols!(rusqlite::Row<'_>, get);

impl SqliteStore {
    async fn claim_due(
        &self,
        owner: &str,
        limit: u32,
        lease_ttl: Duration,
        now: Timestamp,
    ) -> Result<Vec<(RunRow, Lease)>> {
        let job = ClaimJob {
            owner: owner.to_string(),
            limit,
            lease_ttl,
            now,
        };
        self.write(|reply| WriteJob::Claim(job, reply)).await
    }

    async fn renew_lease(&self, run: RunId, lease: &Lease, expires_at: Timestamp) -> Result<()> {
        let job = LeaseJob {
            run,
            lease: lease.clone(),
            expires_at,
        };
        self.write(|reply| WriteJob::Heartbeat(job, reply)).await
    }

    async fn drop_lease(&self, run: RunId, lease: &Lease) -> Result<()> {
        let job = LeaseJob {
            run,
            lease: lease.clone(),
            expires_at: Timestamp(0),
        };
        self.write(|reply| WriteJob::Release(job, reply)).await
    }

    /// One process writes a SQLite file: its writer does not share out work by load.
    fn count_executing(&self, _count: Option<ExecutingCount>) {}
}

impl SqliteStore {
    async fn list_runs_sql(&self, f: &RunFilter) -> Result<Vec<RunRow>> {
        let rows = sqlx::query(&format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE ($1 IS NULL OR status = $1) AND ($2 IS NULL OR definition = $2) \
             AND ($3 IS NULL OR id < $3) ORDER BY id DESC LIMIT $4"
        ))
        .bind(f.status.map(RunStatus::as_str))
        .bind(&f.definition)
        .bind(f.before.map(|b| b.to_string()))
        .bind(f.limit.max(1) as i64)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(run_from_row).collect()
    }

    async fn durability_settings(&self) -> Result<String> {
        let sync: i64 = sqlx::query_scalar("PRAGMA synchronous").fetch_one(&self.pool).await?;
        let mode: String = sqlx::query_scalar("PRAGMA journal_mode").fetch_one(&self.pool).await?;
        let name = match sync {
            0 => "OFF",
            1 => "NORMAL",
            2 => "FULL",
            3 => "EXTRA",
            _ => "?",
        };
        Ok(format!("journal_mode={mode} synchronous={name}"))
    }

    /// A run id as this backend binds it.
    fn key(run: RunId) -> String {
        run.to_string()
    }

    async fn list_jobs(&self, f: &JobFilter) -> Result<Vec<FailoverJobRow>> {
        // Only the filters given, so each query walks an index in (filter, job_id) order and
        // stops at the page size (keyset pagination, newest first).
        let mut clauses: Vec<String> = Vec::new();
        let mut binds: Vec<&str> = Vec::new();
        let before = f.before.map(|b| b.to_string());
        for (column, value) in [
            ("f.status = ", f.status.as_deref()),
            ("f.job_type = ", f.job_type.as_deref()),
            ("f.vm_id = ", f.vm_id.as_deref()),
            ("f.job_id < ", before.as_deref()),
        ] {
            if let Some(v) = value {
                binds.push(v);
                clauses.push(format!("{column}${}", binds.len()));
            }
        }
        if !f.definitions.is_empty() {
            let start = binds.len();
            binds.extend(f.definitions.iter().map(String::as_str));
            let list: Vec<String> = (start + 1..=binds.len()).map(|i| format!("${i}")).collect();
            clauses.push(format!("r.definition IN ({})", list.join(", ")));
        }
        let filter = match clauses.is_empty() {
            true => String::new(),
            false => format!("WHERE {}", clauses.join(" AND ")),
        };
        let sql = format!(
            // CROSS JOIN keeps failover_jobs the outer loop: the page walks its index backwards
            // and stops after `limit` rows instead of sorting every run of the definitions.
            "SELECT {JOB_COLUMNS} FROM failover_jobs f CROSS JOIN runs r ON r.id = f.job_id {filter} \
             ORDER BY f.job_id DESC LIMIT {}",
            f.limit.max(1)
        );
        let mut q = sqlx::query(&sql);
        for v in binds {
            q = q.bind(v);
        }
        let rows = q.fetch_all(&self.pool).await?;
        rows.iter().map(job_from_row).collect()
    }

    /// No row locks: `BEGIN IMMEDIATE` already holds the database's write lock.
    const FOR_UPDATE: &'static str = "";
    const LEAST: &'static str = "MIN";

    /// One process writes a SQLite file: the in-process wake-up (after commit) is enough.
    async fn notify(&self, _tx: &mut sqlx::SqliteConnection) -> Result<()> {
        Ok(())
    }

    /// A write transaction (SQLite takes the write lock at BEGIN, so it never upgrades later).
    async fn begin_write(&self) -> Result<sqlx::Transaction<'_, sqlx::Sqlite>> {
        Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?)
    }
}

super::shared::inventory_and_jobs!(SqliteStore, SqliteRow);
super::shared::run_reads!(SqliteStore);
super::diagnostics::diagnostics!(SqliteStore);
super::shared::run_writes!(SqliteStore, "sqlite");

const JOB_COLUMNS: &str = "f.job_id, f.vm_id, f.vm_name, f.job_type, f.status, f.linstor_snapshot_name, \
    f.destination_vm_id, f.network_mappings, f.error_message, f.correlation_id, f.created_at, f.started_at, f.completed_at";
