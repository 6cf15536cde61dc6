//! Persistence: the [`Store`] trait, its error type, and the two sqlx backends
//! (SQLite, the embedded default, and PostgreSQL for many workers on many machines).
//!
//! SQL lives only in the backend modules. Every state write is a compare-and-set on the run's
//! fencing token and journal position; a lost race is the typed [`StoreError::Fenced`].

mod diagnostics;
pub(crate) mod group;
pub mod postgres;
pub mod projection;
mod shared;
pub mod sqlite;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;

use crate::domain::auth::{Credential, Role};
use crate::domain::failover::JobSubject;
use crate::domain::inventory::{NetworkKind, NetworkMapping, VmRecord};
use crate::domain::run::{Record, RunContext, RunState, RunStatus};
use crate::domain::{RunId, Timestamp};
pub use projection::{Projection, TrackingUpdate};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The run's lease was taken over (or its state moved on): stop touching it.
    #[error("run {run}: fenced (lease taken over or state changed underneath)")]
    Fenced { run: RunId },
    #[error("run {0} not found")]
    NotFound(RunId),
    /// Another unfinished run holds the exclusive key (e.g. a failover of the same VM).
    #[error("{key:?} is held by an unfinished run")]
    Conflict { key: String },
    /// Stored data that does not parse (a bug or a hand-edited row).
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
    /// The database could not be reached or answered with an error.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// An error of the SQLite writer's own connection (see `store::sqlite::writer`).
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("bad database URL or option: {0}")]
    Config(String),
    /// The server is shutting down and dropped the work under way (a submit while it commits);
    /// whatever was committed stays, so the same request may be sent again.
    #[error("the server is shutting down")]
    ShuttingDown,
    /// The group-commit writer is gone (it failed or panicked): nothing more can be written
    /// through this store; the process must be restarted.
    #[error("the database writer has stopped")]
    WriterStopped,
    /// A request the store is not built to take (a bug in the caller, not in the data).
    #[error("internal store error: {0}")]
    Internal(&'static str),
}

impl StoreError {
    /// Transient problems worth retrying (connection lost, pool timeout, database busy, a
    /// server shutting down).
    pub fn is_retryable(&self) -> bool {
        match self {
            StoreError::Database(e) => match e {
                sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => true,
                sqlx::Error::Database(db) => {
                    let sqlite = db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some();
                    db.code().is_some_and(|code| transient_code(&code, sqlite))
                }
                _ => false,
            },
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => matches!(
                e.code,
                rusqlite::ErrorCode::DatabaseBusy
                    | rusqlite::ErrorCode::DatabaseLocked
                    | rusqlite::ErrorCode::SystemIoFailure
                    | rusqlite::ErrorCode::DiskFull
            ),
            StoreError::Sqlite(_) => false,
            StoreError::ShuttingDown => true,
            StoreError::Fenced { .. }
            | StoreError::NotFound(_)
            | StoreError::Conflict { .. }
            | StoreError::Corrupt(_)
            | StoreError::Migrate(_)
            | StoreError::Config(_)
            | StoreError::WriterStopped
            | StoreError::Internal(_) => false,
        }
    }
}

/// Whether a database's error code says "try again": a PostgreSQL SQLSTATE of a lost or
/// refused connection (08), a transaction rolled back by a conflict (40), a server short of
/// resources (53), shutting down or starting (57P), a system error (58), a standby that is read
/// only (25006), a lock or statement timeout (55P03, 57014); or a SQLite result code whose
/// primary code is BUSY, LOCKED, IOERR or FULL. Any other error (bad data, a constraint, a NUL
/// byte PostgreSQL refuses) would fail again the same way.
fn transient_code(code: &str, sqlite: bool) -> bool {
    if sqlite {
        return code.parse::<i32>().is_ok_and(|c| matches!(c & 0xff, 5 | 6 | 10 | 13));
    }
    ["08", "40", "53", "57P", "58"]
        .iter()
        .any(|class| code.starts_with(class))
        || matches!(code, "25006" | "55P03" | "57014")
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// Proof of a claim: the worker that holds a run and the fencing token it got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub owner: String,
    pub token: i64,
}

/// A run as stored.
#[derive(Debug, Clone)]
pub struct RunRow {
    pub id: RunId,
    pub definition: String,
    pub definition_hash: String,
    pub request_id: Option<String>,
    pub correlation_id: String,
    pub state: RunState,
    pub status: RunStatus,
    pub display_status: String,
    pub current_step: Option<String>,
    pub input: Value,
    pub context: RunContext,
    pub last_seq: i64,
    pub fencing_token: i64,
    pub lease_owner: Option<String>,
    pub lease_expires_at: Option<Timestamp>,
    pub wake_at: Option<Timestamp>,
    pub signals_pending: i64,
    pub cancel_reason: Option<String>,
    /// Who asked for the cancel.
    pub cancel_by: Option<String>,
    pub cancel_pending: bool,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    pub started_at: Option<Timestamp>,
    pub completed_at: Option<Timestamp>,
    /// The W3C `traceparent` of the call that submitted the run, if it was traced.
    pub trace_parent: Option<String>,
}

/// A run to create. `request_id` makes submission idempotent.
#[derive(Debug, Clone)]
pub struct NewRun {
    pub id: RunId,
    pub definition: String,
    pub definition_hash: String,
    pub definition_source: String,
    /// `failover_jobs.job_type` ("test", "live", or the definition name).
    pub job_type: String,
    pub request_id: Option<String>,
    pub correlation_id: String,
    pub input: Value,
    /// The job read model's columns that come from the input.
    pub subject: JobSubject,
    /// At most one unfinished run may hold this key (`Conflict` otherwise); None: no lock.
    pub lock_key: Option<String>,
    pub display_status: String,
    /// The first journal entry (`RunSubmitted`).
    pub record: Record,
    /// The projection of `record` and, when the run starts at once, of `start.records`.
    pub projection: Projection,
    pub now: Timestamp,
    /// Start at once on a worker of this process (None: the run waits to be claimed).
    pub start: Option<Start>,
    /// The W3C `traceparent` of the submitting call (None: not traced).
    pub trace_parent: Option<String>,
}

/// Submit-and-start: the run is created already leased to a worker of this process, with its
/// first transition (`Begin`: the first step started) committed in the same transaction. The
/// first step then starts one commit after the request instead of three (submit, claim, begin),
/// and nothing is weaker: the step still starts only after its `step_started` is durable, and if
/// this process dies the lease expires and any worker resumes the run like any other.
#[derive(Debug, Clone)]
pub struct Start {
    pub lease: Lease,
    pub lease_expires_at: Timestamp,
    /// The state after `Begin` (running the first step).
    pub state: RunState,
    /// The journal records of `Begin`, stored after `RunSubmitted`.
    pub records: Vec<Record>,
    pub current_step: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Submitted {
    pub run: RunRow,
    /// False when `request_id` matched an existing run, which is returned instead.
    pub created: bool,
    /// The journal entries this submit committed (the whole journal of the run it created);
    /// empty when it created nothing. Spares a caller reading back what it just wrote.
    pub journal: Vec<JournalEntry>,
}

impl NewRun {
    /// The journal entries the run is created with: `RunSubmitted`, then `Begin`'s records if
    /// it starts at once.
    pub fn journal(&self) -> Vec<JournalEntry> {
        let started = self.start.as_ref().map_or(&[][..], |s| &s.records[..]);
        std::iter::once(&self.record)
            .chain(started)
            .enumerate()
            .map(|(i, record)| JournalEntry {
                run_id: self.id,
                seq: 1 + i as i64,
                record: record.clone(),
                at: self.now,
            })
            .collect()
    }
}

/// One transaction: append `records` to the journal and move the run to `state`, provided
/// the run is still at `expected_seq` under `lease` (compare-and-set). A checkpoint that
/// finishes the run also needs no cancel pending unless it delivers it (`consumed_cancel`):
/// no terminal run keeps an unrecorded cancel. Either miss is `Fenced`; the driver reads the
/// run to tell them apart.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub run_id: RunId,
    pub lease: Lease,
    pub expected_seq: i64,
    pub expected_status: RunStatus,
    pub state: RunState,
    pub display_status: String,
    pub current_step: Option<String>,
    /// The new context, when the transition changed it.
    pub context: Option<RunContext>,
    pub records: Vec<Record>,
    pub wake_at: Option<Timestamp>,
    /// Wake the run at once instead of at `wake_at` if a named signal is waiting (the run is
    /// going to sleep in a state that accepts signals).
    pub wake_on_signal: bool,
    /// Give up the lease (the run goes to sleep or is finished).
    pub release: bool,
    /// Signal rows this transition delivered.
    pub consumed_signals: Vec<i64>,
    /// This transition delivered the pending cancel request.
    pub consumed_cancel: bool,
    pub projection: Projection,
    pub now: Timestamp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckpointOutcome {
    pub last_seq: i64,
    pub signals_pending: i64,
    pub cancel_pending: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct JournalEntry {
    pub run_id: RunId,
    pub seq: i64,
    pub record: Record,
    pub at: Timestamp,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignalRow {
    pub id: i64,
    pub name: String,
    /// Who sent it (None: sent without an authenticated caller).
    pub by: Option<String>,
}

/// What became of a signal or cancel request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalOutcome {
    /// Stored; the run will see it.
    Accepted,
    /// The same signal (or a cancel) was already stored: nothing changed.
    Duplicate,
    /// The run is already finished.
    Finished(RunStatus),
}

#[derive(Debug, Clone, Default)]
pub struct RunFilter {
    pub status: Option<RunStatus>,
    pub definition: Option<String>,
    /// Keyset pagination: only runs with an id below this one (newest first).
    pub before: Option<RunId>,
    pub limit: u32,
}

/// Which `failover_jobs` rows to list (newest first, keyset on the run id).
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    /// Only runs of these definitions (all when empty).
    pub definitions: Vec<String>,
    /// The user-visible status (`failover_jobs.status`).
    pub status: Option<String>,
    pub job_type: Option<String>,
    pub vm_id: Option<String>,
    /// Only jobs whose run id is below this one.
    pub before: Option<RunId>,
    pub limit: u32,
}

/// A row of the seeds' `failover_jobs` projection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailoverJobRow {
    pub job_id: String,
    pub vm_id: String,
    pub vm_name: Option<String>,
    pub job_type: String,
    pub status: String,
    pub linstor_snapshot_name: Option<String>,
    pub destination_vm_id: Option<String>,
    /// The network mappings the new VM got (source network → CloudStack network), once it is
    /// created.
    pub network_mappings: Option<std::collections::BTreeMap<String, String>>,
    pub error_message: Option<String>,
    pub correlation_id: Option<String>,
    pub created_at: String,
    pub started_at: Option<String>,
    pub completed_at: Option<String>,
}

/// A row of the seeds' `job_tracking` projection.
#[derive(Debug, Clone, PartialEq)]
pub struct JobTrackingRow {
    pub id: String,
    pub parent_job_id: String,
    pub operation: String,
    pub status: String,
    pub metadata: Value,
    pub error_message: Option<String>,
    /// The run's correlation id (None on rows written before it was kept).
    pub correlation_id: Option<String>,
}

/// One side effect recorded by the built-in test actions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerRow {
    pub key: String,
    pub run_id: RunId,
    pub step: String,
    pub attempt: i64,
    pub kind: String,
}

/// Wakes workers when there is new work (a submit, a signal, a run put to sleep with a near timer).
#[derive(Debug, Default)]
pub struct Wakeup {
    notify: tokio::sync::Notify,
}

impl Wakeup {
    pub fn wake(&self) {
        self.notify.notify_waiters();
        self.notify.notify_one();
    }

    pub async fn wait(&self) {
        self.notify.notified().await
    }
}

/// How many runs a process's worker is executing or starting now (its busy slots), for
/// [`RunStore::set_executing_count`].
pub type ExecutingCount = Arc<dyn Fn() -> usize + Send + Sync>;

/// Everything a backend stores; each part is its own trait so a reader (and a caller) can tell
/// which tables a method touches.
pub trait Store: RunStore + RunReader + JobStore + InventoryStore + PrincipalStore + Diagnostics + Ledger {}

impl<T: RunStore + RunReader + JobStore + InventoryStore + PrincipalStore + Diagnostics + Ledger> Store for T {}

/// Writing runs: submit, claim and lease, checkpoint, signal and cancel.
#[async_trait]
pub trait RunStore: Send + Sync + 'static {
    /// Creates a run with its first journal entry, or returns the run its `request_id` already made.
    async fn submit(&self, run: NewRun) -> Result<Submitted>;
    /// Claims up to `limit` runs that are due and not leased, each with a new fencing token.
    async fn claim(&self, owner: &str, limit: u32, lease_ttl: Duration, now: Timestamp)
        -> Result<Vec<(RunRow, Lease)>>;
    /// Extends a lease; `Fenced` if another worker took the run over.
    async fn heartbeat(&self, run: RunId, lease: &Lease, expires_at: Timestamp) -> Result<()>;
    /// Commits one transition (journal append + compare-and-set of the run + projections).
    async fn checkpoint(&self, cp: Checkpoint) -> Result<CheckpointOutcome>;
    /// Gives a lease back without changing the run (shutdown): another worker may claim it at once.
    async fn release(&self, run: RunId, lease: &Lease) -> Result<()>;
    /// Leases one run that no live worker holds, for a change an operator asked for (resolving
    /// a finished run). None while a worker's lease on it is live.
    async fn take(&self, run: RunId, owner: &str, lease_ttl: Duration, now: Timestamp) -> Result<Option<Lease>>;
    /// Stores a named signal for a run (idempotent per name), with the principal that sent it,
    /// and wakes the run.
    async fn signal(&self, run: RunId, name: &str, by: Option<&str>, now: Timestamp) -> Result<SignalOutcome>;
    /// Stores a cancel request (idempotent), with the principal that sent it, and wakes the run.
    async fn cancel(&self, run: RunId, reason: &str, by: Option<&str>, now: Timestamp) -> Result<SignalOutcome>;
    /// The wake-up channel of this store (in-process; PostgreSQL also feeds it from LISTEN).
    fn wakeup(&self) -> Arc<Wakeup>;
    /// A short name for logs and the bench: "sqlite" or "postgres".
    fn backend(&self) -> &'static str;
    /// How many runs this process's worker executes now, set while a worker runs (None once it
    /// stopped; with two workers on one store, the last one started). A backend whose writer
    /// shares the database with other processes sizes its batches by it; the others ignore it.
    fn set_executing_count(&self, _count: Option<ExecutingCount>) {}
}

/// Reading runs, their journal and their pending signals (no lease needed).
#[async_trait]
pub trait RunReader: Send + Sync + 'static {
    async fn get_run(&self, run: RunId) -> Result<Option<RunRow>>;
    async fn find_by_request_id(&self, request_id: &str) -> Result<Option<RunRow>>;
    async fn list_runs(&self, filter: &RunFilter) -> Result<Vec<RunRow>>;
    /// Journal entries with `seq > after`, in order, at most `limit`.
    async fn journal(&self, run: RunId, after: i64, limit: u32) -> Result<Vec<JournalEntry>>;
    /// The exact definition text a run is pinned to.
    async fn definition_source(&self, hash: &str) -> Result<Option<String>>;
    /// Named signals not yet delivered, oldest first.
    async fn pending_signals(&self, run: RunId) -> Result<Vec<SignalRow>>;
    /// The earliest wake-up time after `now` (to sleep exactly until the next timer).
    async fn next_wake_after(&self, now: Timestamp) -> Result<Option<Timestamp>>;
}

/// Figures about the database itself, for `tern bench`, the tests and operators.
#[async_trait]
pub trait Diagnostics: Send + Sync + 'static {
    /// Rows in the journal, all runs (the bench counts stored checkpoints with it).
    async fn journal_rows(&self) -> Result<i64>;
    /// The durability settings in force, as the database reports them (for the bench).
    async fn durability(&self) -> Result<String>;
    /// Counts runs by status.
    async fn count_by_status(&self) -> Result<Vec<(RunStatus, i64)>>;
    /// What the metrics endpoint shows at a scrape (a few indexed counts).
    async fn gauges(&self, now: Timestamp) -> Result<Gauges>;
    /// One round trip to the database (the health check).
    async fn ping(&self) -> Result<()>;
}

/// The store's figures at one moment, for the metrics endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Gauges {
    /// Runs by definition and status.
    pub runs: Vec<(String, RunStatus, i64)>,
    /// Runs due to run that no worker holds (the queue).
    pub due: i64,
    /// When the oldest of them became due.
    pub oldest_due: Option<Timestamp>,
    /// Failover jobs in `needs_operator`.
    pub needs_operator: i64,
}

/// The failover job read model (`failover_jobs`, `job_tracking`), kept in the same commits as
/// the journal it is projected from.
#[async_trait]
pub trait JobStore: Send + Sync + 'static {
    /// The run's `failover_jobs` projection row.
    async fn failover_job(&self, run: RunId) -> Result<Option<FailoverJobRow>>;
    /// `failover_jobs` rows matching `filter`, newest first.
    async fn list_failover_jobs(&self, filter: &JobFilter) -> Result<Vec<FailoverJobRow>>;
    /// The run's `job_tracking` projection rows, in creation order.
    async fn job_tracking(&self, run: RunId) -> Result<Vec<JobTrackingRow>>;
    /// The runs that hold this VM, except `except`: unfinished ones, and those that need an
    /// operator and were not resolved yet.
    async fn active_jobs_for_vm(&self, vm_id: &str, except: Option<RunId>) -> Result<Vec<String>>;
}

/// The VM inventory (what was replicated, and where its disk is) and the network mappings.
#[async_trait]
pub trait InventoryStore: Send + Sync + 'static {
    /// Inserts or replaces a VM in the inventory.
    async fn upsert_vm_record(&self, vm: &VmRecord, now: Timestamp) -> Result<()>;
    async fn vm_record(&self, vm_id: &str) -> Result<Option<VmRecord>>;
    /// Looks a VM up by id, or else by name.
    async fn find_vm_record(&self, id_or_name: &str) -> Result<Option<VmRecord>>;
    async fn vm_records(&self) -> Result<Vec<VmRecord>>;
    /// At most `limit` VMs whose id sorts after `after` ("" for the first), by id.
    async fn vm_records_after(&self, after: &str, limit: u32) -> Result<Vec<VmRecord>>;
    /// Replaces the VM's mappings of one kind.
    async fn set_network_mappings(&self, vm_id: &str, kind: NetworkKind, mappings: &[NetworkMapping]) -> Result<()>;
    async fn network_mappings(&self, vm_id: &str) -> Result<Vec<NetworkMapping>>;
}

/// Who may call the API (see [`crate::domain::auth`]): tokens, kept as SHA-256 hashes, and
/// client-certificate names, each with a role.
#[async_trait]
pub trait PrincipalStore: Send + Sync + 'static {
    /// Adds a principal; `Conflict` when one of that name is active (a revoked one is replaced).
    async fn add_principal(&self, p: &PrincipalRow) -> Result<()>;
    /// Every principal, revoked ones too, by name.
    async fn principals(&self) -> Result<Vec<PrincipalRow>>;
    /// Revokes the active principal `name`; false when there is none.
    async fn revoke_principal(&self, name: &str, now: Timestamp) -> Result<bool>;
    /// The active principal whose token hashes to `sha256` (hex).
    async fn principal_by_token(&self, sha256: &str) -> Result<Option<PrincipalRow>>;
    /// The active certificate principal named `name`.
    async fn principal_by_certificate(&self, name: &str) -> Result<Option<PrincipalRow>>;
}

/// A row of `principals`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrincipalRow {
    pub name: String,
    pub role: Role,
    pub credential: Credential,
    /// Tokens only: the SHA-256 of the token, hex.
    pub token_sha256: Option<String>,
    pub created_at: Timestamp,
    pub revoked_at: Option<Timestamp>,
}

/// The side-effect ledger of the `test.*` actions: the crash tests count side effects in it.
#[async_trait]
pub trait Ledger: Send + Sync + 'static {
    /// Records a side effect under `key` unless one exists (`adopt`), in which case the
    /// existing one is adopted. Returns true when a new row was written.
    async fn ledger_record(&self, row: &LedgerRow, adopt: bool) -> Result<bool>;
    async fn ledger(&self, run: Option<RunId>) -> Result<Vec<LedgerRow>>;
}

/// Loads an inventory file: inserts or replaces its VMs, and replaces each VM's test and
/// production mappings with the file's (a VM the file gives no mappings of a kind keeps its own).
pub async fn load_inventory(
    store: &dyn Store,
    inv: &crate::domain::inventory::InventoryFile,
    now: Timestamp,
) -> Result<()> {
    for vm in &inv.vms {
        store.upsert_vm_record(vm, now).await?;
        for kind in [NetworkKind::Test, NetworkKind::Production] {
            let mappings: Vec<NetworkMapping> = inv
                .network_mappings
                .iter()
                .filter(|m| m.vm_id == vm.vm_id && m.kind == kind)
                .cloned()
                .collect();
            if !mappings.is_empty() {
                store.set_network_mappings(&vm.vm_id, kind, &mappings).await?;
            }
        }
    }
    Ok(())
}

/// Opens the store a URL names: `sqlite://path` (a file; in-memory databases are refused) or
/// `postgres://…`.
/// A PostgreSQL URL may carry `tern_schema=NAME` to keep Tern's tables in their own schema
/// (several isolated Terns on one database; the tests use it).
pub async fn open(url: &str) -> Result<Arc<dyn Store>> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let (url, schema) = split_schema(url);
        Ok(Arc::new(postgres::PgStore::connect(&url, schema.as_deref()).await?))
    } else if url.starts_with("sqlite:") {
        Ok(Arc::new(sqlite::SqliteStore::connect(url).await?))
    } else {
        Err(StoreError::Config(format!(
            "unsupported database URL {:?}: use sqlite://PATH or postgres://…",
            redact_url(url)
        )))
    }
}

/// Removes a `tern_schema=NAME` query parameter from a URL, returning it separately.
pub fn split_schema(url: &str) -> (String, Option<String>) {
    let Some((base, query)) = url.split_once('?') else {
        return (url.to_string(), None);
    };
    let mut schema = None;
    let rest: Vec<&str> = query
        .split('&')
        .filter(|kv| match kv.strip_prefix("tern_schema=") {
            Some(v) => {
                schema = Some(v.to_string());
                false
            }
            None => true,
        })
        .collect();
    if rest.is_empty() {
        (base.to_string(), schema)
    } else {
        (format!("{base}?{}", rest.join("&")), schema)
    }
}

/// A URL with any password removed (in its user info or as a `password`/`sslpassword` query
/// parameter), safe for logs and errors. A URL that does not parse is not shown at all.
pub fn redact_url(raw: &str) -> String {
    let Ok(mut u) = url::Url::parse(raw) else {
        return "<a database URL that does not parse>".into();
    };
    if u.password().is_some() {
        let _ = u.set_password(Some("***"));
    }
    if u.query().is_some() {
        let secret = |k: &str| k.eq_ignore_ascii_case("password") || k.eq_ignore_ascii_case("sslpassword");
        let pairs: Vec<(String, String)> = u
            .query_pairs()
            .map(|(k, v)| {
                let v = if secret(&k) { "***".to_string() } else { v.into_owned() };
                (k.into_owned(), v)
            })
            .collect();
        u.query_pairs_mut().clear().extend_pairs(pairs);
    }
    u.to_string()
}

pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(what: &str, v: Value) -> Result<T> {
    serde_json::from_value(v).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

#[cfg(test)]
mod tests {
    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            super::redact_url("postgres://me:s3cret@db:5432/x"),
            "postgres://me:***@db:5432/x"
        );
        assert_eq!(super::redact_url("sqlite://a.db"), "sqlite://a.db");
        assert_eq!(
            super::redact_url("postgres://db/x?user=me&password=s3cret&sslmode=require"),
            "postgres://db/x?user=me&password=***&sslmode=require"
        );
        assert_eq!(
            super::redact_url("postgres://me:pw@db/x?PASSWORD=s3cret"),
            "postgres://me:***@db/x?PASSWORD=***"
        );
        assert!(!super::redact_url("postgres://me:s3cret@[bad").contains("s3cret"));
        assert_eq!(
            super::split_schema("postgres://h/db?tern_schema=t1&sslmode=disable"),
            ("postgres://h/db?sslmode=disable".to_string(), Some("t1".to_string()))
        );
        assert_eq!(
            super::split_schema("postgres://h/db?tern_schema=t1"),
            ("postgres://h/db".to_string(), Some("t1".to_string()))
        );
        assert_eq!(
            super::split_schema("postgres://h/db"),
            ("postgres://h/db".to_string(), None)
        );
    }

    #[test]
    fn only_errors_of_availability_are_transient() {
        for code in ["08006", "40001", "40P01", "53300", "57P01", "57P03", "58030", "25006"] {
            assert!(super::transient_code(code, false), "{code}");
        }
        for code in ["5", "517", "6", "13"] {
            assert!(super::transient_code(code, true), "{code}");
        }
        // A NUL byte, a constraint, a type, a syntax error: the same again on a retry.
        for code in ["22021", "22P05", "23505", "42804", "42601"] {
            assert!(!super::transient_code(code, false), "{code}");
        }
        for code in ["19", "2067", "1"] {
            assert!(!super::transient_code(code, true), "{code}");
        }
    }

    #[tokio::test]
    async fn an_in_memory_sqlite_database_is_refused_with_the_reason() {
        let err = match super::open("sqlite::memory:").await {
            Ok(_) => panic!("an in-memory database was accepted"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("in-memory SQLite database is not supported"), "{err}");
    }
}
