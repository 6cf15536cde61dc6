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

const RUN_COLUMNS: &str =
    "id, definition, definition_hash, request_id, correlation_id, state, status, display_status, \
    current_step, input, context, last_seq, fencing_token, lease_owner, lease_expires_at, wake_at, signals_pending, \
    cancel_reason, cancel_pending, created_at, updated_at, started_at, completed_at";

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
        let stopped = || StoreError::Config("the database writer has stopped".into());
        let (reply, answer) = oneshot::channel();
        self.writer.send(job(reply)).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

fn ts(v: Option<i64>) -> Option<Timestamp> {
    v.map(Timestamp)
}

/// Column access shared by the pool (sqlx) and the writer thread (rusqlite), so a run row is
/// decoded in one place whichever connection read it.
trait Cols {
    fn text(&self, col: &str) -> Result<Option<String>>;
    fn int(&self, col: &str) -> Result<Option<i64>>;
}

impl Cols for SqliteRow {
    fn text(&self, col: &str) -> Result<Option<String>> {
        Ok(self.try_get(col)?)
    }
    fn int(&self, col: &str) -> Result<Option<i64>> {
        Ok(self.try_get(col)?)
    }
}

impl Cols for rusqlite::Row<'_> {
    fn text(&self, col: &str) -> Result<Option<String>> {
        Ok(self.get(col)?)
    }
    fn int(&self, col: &str) -> Result<Option<i64>> {
        Ok(self.get(col)?)
    }
}

fn run_from_row(row: &impl Cols) -> Result<RunRow> {
    let text = |c: &str| {
        row.text(c)?
            .ok_or_else(|| StoreError::Corrupt(format!("runs.{c} is NULL")))
    };
    let int = |c: &str| {
        row.int(c)?
            .ok_or_else(|| StoreError::Corrupt(format!("runs.{c} is NULL")))
    };
    let doc = |c: &str| -> Result<Value> {
        serde_json::from_str(&text(c)?).map_err(|e| StoreError::Corrupt(format!("runs.{c}: {e}")))
    };
    let id = text("id")?;
    let status = text("status")?;
    Ok(RunRow {
        id: id
            .parse()
            .map_err(|e| StoreError::Corrupt(format!("run id {id:?}: {e}")))?,
        definition: text("definition")?,
        definition_hash: text("definition_hash")?,
        request_id: row.text("request_id")?,
        correlation_id: text("correlation_id")?,
        state: parse_json("run state", doc("state")?)?,
        status: RunStatus::parse(&status).ok_or_else(|| StoreError::Corrupt(format!("status {status:?}")))?,
        display_status: text("display_status")?,
        current_step: row.text("current_step")?,
        input: doc("input")?,
        context: RunContext::from_value(doc("context")?)
            .map_err(|e| StoreError::Corrupt(format!("run context: {e}")))?,
        last_seq: int("last_seq")?,
        fencing_token: int("fencing_token")?,
        lease_owner: row.text("lease_owner")?,
        lease_expires_at: ts(row.int("lease_expires_at")?),
        wake_at: ts(row.int("wake_at")?),
        signals_pending: int("signals_pending")?,
        cancel_reason: row.text("cancel_reason")?,
        cancel_pending: int("cancel_pending")? != 0,
        created_at: Timestamp(int("created_at")?),
        updated_at: Timestamp(int("updated_at")?),
        started_at: ts(row.int("started_at")?),
        completed_at: ts(row.int("completed_at")?),
    })
}

#[async_trait]
impl RunStore for SqliteStore {
    async fn submit(&self, run: NewRun) -> Result<Submitted> {
        // A run started at submit is already leased: no worker needs to look for it.
        let claimable = run.start.is_none();
        let submitted = self.write(|reply| WriteJob::Submit(Box::new(run), reply)).await?;
        if submitted.created && claimable {
            self.wakeup.wake();
        }
        Ok(submitted)
    }

    async fn claim(
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

    async fn heartbeat(&self, run: RunId, lease: &Lease, expires_at: Timestamp) -> Result<()> {
        let job = LeaseJob {
            run,
            lease: lease.clone(),
            expires_at,
        };
        self.write(|reply| WriteJob::Heartbeat(job, reply)).await
    }

    async fn checkpoint(&self, cp: Checkpoint) -> Result<CheckpointOutcome> {
        self.write(|reply| WriteJob::Checkpoint(Box::new(cp), reply)).await
    }

    async fn release(&self, run: RunId, lease: &Lease) -> Result<()> {
        let job = LeaseJob {
            run,
            lease: lease.clone(),
            expires_at: Timestamp(0),
        };
        self.write(|reply| WriteJob::Release(job, reply)).await
    }

    async fn signal(&self, run: RunId, name: &str, now: Timestamp) -> Result<SignalOutcome> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let status: Option<String> = sqlx::query_scalar("SELECT status FROM runs WHERE id = $1")
            .bind(run.to_string())
            .fetch_optional(&mut *tx)
            .await?;
        let status = status.ok_or(StoreError::NotFound(run))?;
        let status = RunStatus::parse(&status).ok_or_else(|| StoreError::Corrupt(format!("status {status:?}")))?;
        if status.is_terminal() {
            return Ok(SignalOutcome::Finished(status));
        }
        let inserted = sqlx::query(
            "INSERT INTO signals (run_id, name, created_at) VALUES ($1, $2, $3) ON CONFLICT (run_id, name) DO NOTHING",
        )
        .bind(run.to_string())
        .bind(name)
        .bind(now.0)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted == 0 {
            return Ok(SignalOutcome::Duplicate);
        }
        sqlx::query(
            "UPDATE runs SET signals_pending = signals_pending + 1, \
             wake_at = CASE WHEN status = 'holding' THEN MIN(COALESCE(wake_at, $2), $2) ELSE wake_at END WHERE id = $1",
        )
        .bind(run.to_string())
        .bind(now.0)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.wakeup.wake();
        Ok(SignalOutcome::Accepted)
    }

    async fn cancel(&self, run: RunId, reason: &str, now: Timestamp) -> Result<SignalOutcome> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let row = sqlx::query("SELECT status, cancel_reason FROM runs WHERE id = $1")
            .bind(run.to_string())
            .fetch_optional(&mut *tx)
            .await?
            .ok_or(StoreError::NotFound(run))?;
        let status: String = row.try_get("status")?;
        let status = RunStatus::parse(&status).ok_or_else(|| StoreError::Corrupt(format!("status {status:?}")))?;
        if status.is_terminal() {
            return Ok(SignalOutcome::Finished(status));
        }
        if row.try_get::<Option<String>, _>("cancel_reason")?.is_some() {
            return Ok(SignalOutcome::Duplicate);
        }
        sqlx::query(
            "UPDATE runs SET cancel_reason = $2, cancel_pending = 1, wake_at = MIN(COALESCE(wake_at, $3), $3) WHERE id = $1",
        )
        .bind(run.to_string())
        .bind(reason)
        .bind(now.0)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.wakeup.wake();
        Ok(SignalOutcome::Accepted)
    }

    fn wakeup(&self) -> Arc<Wakeup> {
        self.wakeup.clone()
    }

    fn backend(&self) -> &'static str {
        "sqlite"
    }
}

#[async_trait]
impl Ledger for SqliteStore {
    async fn ledger_record(&self, row: &LedgerRow, adopt: bool) -> Result<bool> {
        // Look up, then create: two statements, like a real cloud API (no atomic upsert to hide behind).
        if adopt {
            let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM ledger WHERE key = $1")
                .bind(&row.key)
                .fetch_one(&self.pool)
                .await?;
            if n > 0 {
                return Ok(false);
            }
        }
        sqlx::query("INSERT INTO ledger (key, run_id, step, attempt, kind, at) VALUES ($1, $2, $3, $4, $5, $6)")
            .bind(&row.key)
            .bind(row.run_id.to_string())
            .bind(&row.step)
            .bind(row.attempt)
            .bind(&row.kind)
            .bind(Timestamp::now().0)
            .execute(&self.pool)
            .await?;
        Ok(true)
    }

    async fn ledger(&self, run: Option<RunId>) -> Result<Vec<LedgerRow>> {
        let rows = sqlx::query(
            "SELECT key, run_id, step, attempt, kind FROM ledger WHERE ($1 IS NULL OR run_id = $1) ORDER BY id",
        )
        .bind(run.map(|r| r.to_string()))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let id: String = r.try_get("run_id")?;
                Ok(LedgerRow {
                    key: r.try_get("key")?,
                    run_id: id
                        .parse()
                        .map_err(|e| StoreError::Corrupt(format!("ledger run id: {e}")))?,
                    step: r.try_get("step")?,
                    attempt: r.try_get("attempt")?,
                    kind: r.try_get("kind")?,
                })
            })
            .collect()
    }
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

    /// A write transaction (SQLite takes the write lock at BEGIN, so it never upgrades later).
    async fn begin_write(&self) -> Result<sqlx::Transaction<'_, sqlx::Sqlite>> {
        Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?)
    }
}

super::shared::inventory_and_jobs!(SqliteStore);
super::shared::run_reads!(SqliteStore);

const JOB_COLUMNS: &str = "f.job_id, f.vm_id, f.vm_name, f.job_type, f.status, f.linstor_snapshot_name, \
    f.destination_vm_id, f.error_message, f.correlation_id, f.created_at, f.started_at, f.completed_at";

fn job_from_row(r: &SqliteRow) -> Result<FailoverJobRow> {
    Ok(FailoverJobRow {
        job_id: r.try_get("job_id")?,
        vm_id: r.try_get("vm_id")?,
        vm_name: r.try_get("vm_name")?,
        job_type: r.try_get("job_type")?,
        status: r.try_get("status")?,
        linstor_snapshot_name: r.try_get("linstor_snapshot_name")?,
        destination_vm_id: r.try_get("destination_vm_id")?,
        error_message: r.try_get("error_message")?,
        correlation_id: r.try_get("correlation_id")?,
        created_at: r.try_get("created_at")?,
        started_at: r.try_get("started_at")?,
        completed_at: r.try_get("completed_at")?,
    })
}
