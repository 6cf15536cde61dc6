//! The engine: the pure state machine ([`machine`]), the driver that commits each transition
//! before acting on it ([`driver`]), and the worker loop that claims runs ([`worker`]).
//! `watchers.rs` hands what this process commits to the watchers of a run.

pub mod action;
pub mod driver;
pub mod machine;
mod operator;
mod watchers;
pub mod worker;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use self::action::Registry;
pub(crate) use self::watchers::ExecutingGuard;
pub use self::watchers::RunFeed;
use self::watchers::Watchers;
use crate::domain::limits::Problems;
use crate::domain::run::{Record, RunState};
use crate::domain::{RunId, Timestamp};
use crate::store::{self, NewRun, SignalOutcome, Store, StoreError, Submitted};
use crate::workflow::{self, Catalog, Definition, DefinitionError};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("unknown workflow definition {0:?}")]
    UnknownDefinition(String),
    #[error("invalid input: {0}")]
    InvalidInput(Problems),
    #[error("run {0} not found")]
    NotFound(RunId),
    #[error("run {run} is already {status}")]
    Finished { run: RunId, status: &'static str },
    /// The definition is exclusive on an input field and an unfinished run holds that value
    /// (e.g. a second failover of the same VM). Decided by the database at submit.
    #[error("{field} {value:?} is busy: another unfinished run holds it")]
    Busy { field: String, value: String },
    #[error(transparent)]
    Definition(#[from] DefinitionError),
    #[error(transparent)]
    Transition(#[from] machine::TransitionError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Tunables of a worker process.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Identifies this process in leases (host:pid:random by default).
    pub worker_id: String,
    /// How many runs this process drives at once.
    pub concurrency: usize,
    /// How long a claim lasts without a heartbeat; a dead worker's runs move after this.
    pub lease_ttl: Duration,
    /// The fallback poll when no wake-up arrives (wake-ups normally come within milliseconds).
    pub poll_interval: Duration,
    /// On shutdown, how long in-flight steps may run before their leases are released anyway.
    pub shutdown_grace: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            worker_id: default_worker_id(),
            concurrency: 64,
            lease_ttl: Duration::from_secs(30),
            poll_interval: Duration::from_secs(1),
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

pub fn default_worker_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into());
    format!(
        "{host}:{}:{}",
        std::process::id(),
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

/// What a client asks to start.
#[derive(Debug, Clone, Default)]
pub struct SubmitRequest {
    pub definition: String,
    pub input: Value,
    pub request_id: Option<String>,
    pub correlation_id: Option<String>,
    /// The principal submitting it, journaled with the run.
    pub by: Option<String>,
}

pub struct Engine {
    /// Private: everything that changes a run goes through the engine; readers get
    /// [`Engine::get_run`] and [`Engine::journal`].
    store: Arc<dyn Store>,
    pub catalog: Arc<Catalog>,
    pub registry: Arc<Registry>,
    pub config: EngineConfig,
    pinned: Mutex<HashMap<String, Arc<Definition>>>,
    /// Runs this process drove to a terminal state, announced after the commit.
    finished: tokio::sync::broadcast::Sender<RunId>,
    /// The worker of this process, when one runs: submits start on it at once.
    local: Mutex<Option<LocalWorker>>,
    /// Watchers of runs, each sent the entries this process commits for its run, and the runs
    /// this process executes now.
    watchers: Mutex<Watchers>,
}

/// A worker in this process that takes runs straight from [`Engine::submit`] (see [`store::Start`]).
#[derive(Clone)]
pub(crate) struct LocalWorker {
    pub owner: String,
    /// Its free driving slots; a submit starts a run on it only if it can take one.
    pub slots: Arc<tokio::sync::Semaphore>,
    pub runs: tokio::sync::mpsc::UnboundedSender<Dispatched>,
}

/// A run submitted and started in one commit, handed to the local worker to drive.
pub(crate) struct Dispatched {
    pub run: store::RunRow,
    pub lease: store::Lease,
    pub first: driver::Started,
    pub slot: tokio::sync::OwnedSemaphorePermit,
}

/// Logs a run just created (`started`: already leased to this process's worker); the crash
/// tests' point between the commit and what follows it.
fn announce(definition: &str, submitted: &Submitted, started: bool) {
    crate::crash::point("after:run_submitted");
    let run = &submitted.run;
    tracing::info!(run_id = %run.id, definition = %definition, correlation_id = %run.correlation_id, started, "run submitted");
}

/// Hands a run just submitted and started (`dispatch`: its first action, its driving slot and
/// the worker) to the worker to drive; if the worker stopped in between, gives the lease back
/// for whichever worker claims next. The run counts as executing here from now on, before the
/// submit answers: a watch the client opens next then finds its journal in memory, however
/// soon the worker's driver starts.
async fn hand_over(
    engine: &Arc<Engine>,
    submitted: &Submitted,
    (action, slot, worker): (machine::Action, tokio::sync::OwnedSemaphorePermit, LocalWorker),
) {
    let lease = store::Lease {
        owner: worker.owner.clone(),
        token: submitted.run.fencing_token,
    };
    let d = Dispatched {
        run: submitted.run.clone(),
        lease: lease.clone(),
        first: driver::Started {
            action,
            executing: engine.register_executing(&submitted.run, submitted.journal.clone()),
        },
        slot,
    };
    if let Err(undelivered) = worker.runs.send(d) {
        // Not executing here after all: its watchers read the journal again.
        drop(undelivered);
        let id = submitted.run.id;
        if let Err(e) = engine.store.release(id, &lease).await {
            tracing::warn!(run_id = %id, error = %e, "could not release a run the stopped worker did not take; it moves when its lease expires");
        }
        engine.store.wakeup().wake();
    }
}

impl Engine {
    pub fn new(
        store: Arc<dyn Store>,
        catalog: Arc<Catalog>,
        registry: Arc<Registry>,
        config: EngineConfig,
    ) -> Arc<Engine> {
        Arc::new(Engine {
            store,
            catalog,
            registry,
            config,
            pinned: Mutex::new(HashMap::new()),
            finished: tokio::sync::broadcast::channel(4096).0,
            local: Mutex::new(None),
            watchers: Mutex::new(Watchers::default()),
        })
    }

    /// Loads the embedded definitions (overridden by `dir`) against `registry`.
    pub fn with_registry(
        store: Arc<dyn Store>,
        dir: Option<&std::path::Path>,
        registry: Registry,
        config: EngineConfig,
    ) -> Result<Arc<Engine>, EngineError> {
        let catalog = Catalog::load(dir, &|a| registry.contains(a))?;
        Ok(Engine::new(store, Arc::new(catalog), Arc::new(registry), config))
    }

    /// Creates a run (idempotent by `request_id`). The run is committed before this returns.
    pub async fn submit(self: &Arc<Self>, req: SubmitRequest) -> Result<Submitted, EngineError> {
        let def = self
            .catalog
            .get(&req.definition)
            .ok_or_else(|| EngineError::UnknownDefinition(req.definition.clone()))?;
        // A request id already used is answered by the store with its run (`created` false), in
        // the same commit that would have created it: no read first.
        def.validate_input(&req.input).map_err(EngineError::InvalidInput)?;
        let now = Timestamp::now();
        let record = Record::RunSubmitted {
            definition: def.name.clone(),
            definition_hash: def.hash.clone(),
            input: req.input.clone(),
            by: req.by.clone(),
        };
        let id = RunId::new();
        let correlation_id = req.correlation_id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let started = self.start_locally(&def, id, &req.input, now);
        let (display_status, projection) = match &started {
            Some((start, ..)) => {
                let display = def.display_status(&start.state);
                let mut all = vec![record.clone()];
                all.extend(start.records.iter().cloned());
                let p = store::projection::project(&all, &display, &correlation_id);
                (display, p)
            }
            None => (
                def.display_status(&RunState::Pending),
                store::projection::project(std::slice::from_ref(&record), "pending", &correlation_id),
            ),
        };
        let (start, dispatch) = match started {
            Some((start, action, slot, worker)) => (Some(start), Some((action, slot, worker))),
            None => (None, None),
        };
        let lock = def.exclusive_on.as_ref().and_then(|field| {
            req.input
                .get(field)
                .and_then(Value::as_str)
                .filter(|v| !v.is_empty())
                .map(|v| (field.clone(), v.to_string()))
        });
        let run = NewRun {
            id,
            definition: def.name.clone(),
            definition_hash: def.hash.clone(),
            definition_source: def.source.clone(),
            job_type: def.job_type.clone(),
            request_id: req.request_id,
            correlation_id,
            subject: def.job_subject(&req.input),
            input: req.input,
            lock_key: lock.as_ref().map(|(field, value)| format!("{field}={value}")),
            display_status,
            record,
            projection,
            now,
            start,
            trace_parent: crate::telemetry::traces::current_traceparent(),
        };
        let submitted = match dispatch {
            // A run started here is leased to this worker from its commit on, so handing it to
            // the worker must not depend on the caller: a client that goes away while its submit
            // commits drops this future, and the run would sit leased and undriven until the
            // lease expired. The commit and the hand-over run in a task of their own.
            Some(dispatch) => {
                let engine = self.clone();
                let definition = def.name.clone();
                tokio::spawn(async move {
                    let submitted = engine.store.submit(run).await?;
                    if submitted.created {
                        announce(&definition, &submitted, true);
                        hand_over(&engine, &submitted, dispatch).await;
                    }
                    Ok(submitted)
                })
                .await
                .map_err(|e| match e.try_into_panic() {
                    Ok(panic) => std::panic::resume_unwind(panic),
                    // Only a runtime shutting down cancels it; a retry with the same request id
                    // answers with whatever it committed.
                    Err(_) => StoreError::ShuttingDown,
                })?
            }
            None => self.store.submit(run).await.inspect(|submitted| {
                if submitted.created {
                    announce(&def.name, submitted, false);
                }
            }),
        }
        .map_err(|e| match (e, &lock) {
            (StoreError::Conflict { .. }, Some((field, value))) => EngineError::Busy {
                field: field.clone(),
                value: value.clone(),
            },
            (e, _) => EngineError::Store(e),
        })?;
        Ok(submitted)
    }

    /// Prepares submit-and-start on this process's worker: a free slot, and the `Begin`
    /// transition when it starts a step (a run that skips to a hold or finishes at once is
    /// submitted plainly and claimed).
    fn start_locally(
        &self,
        def: &Definition,
        id: RunId,
        input: &Value,
        now: Timestamp,
    ) -> Option<(
        store::Start,
        machine::Action,
        tokio::sync::OwnedSemaphorePermit,
        LocalWorker,
    )> {
        let worker = self.local.lock().ok()?.clone()?;
        let slot = worker.slots.clone().try_acquire_owned().ok()?;
        let m = machine::Machine { run_id: id, def, input };
        let t = m.transition(&RunState::Pending, &machine::Event::Begin, now).ok()?;
        let action = t.action;
        if !matches!(t.state, RunState::Running { .. }) || !matches!(action, machine::Action::Execute { .. }) {
            return None;
        }
        let start = store::Start {
            lease: store::Lease {
                owner: worker.owner.clone(),
                token: 1,
            },
            lease_expires_at: now.plus(self.config.lease_ttl),
            current_step: driver::current_step(def, &t.state),
            state: t.state,
            records: t.records,
        };
        Some((start, action, slot, worker))
    }

    /// Whether a worker of this process is running and takes submits directly.
    pub fn has_local_worker(&self) -> bool {
        self.local.lock().map(|l| l.is_some()).unwrap_or(false)
    }

    /// Registers (or, with None, removes) the worker of this process.
    pub(crate) fn set_local_worker(&self, worker: Option<LocalWorker>) {
        if let Ok(mut l) = self.local.lock() {
            *l = worker;
        }
    }

    /// Sends a named signal (e.g. `end-test`); idempotent.
    pub async fn signal(&self, run: RunId, name: &str) -> Result<SignalOutcome, EngineError> {
        self.signal_as(run, name, None).await
    }

    /// [`Engine::signal`] sent by the principal `by`, whom the journal names.
    pub async fn signal_as(&self, run: RunId, name: &str, by: Option<&str>) -> Result<SignalOutcome, EngineError> {
        self.store
            .signal(run, name, by, Timestamp::now())
            .await
            .map_err(|e| not_found(run, e))
    }

    /// Requests cancellation: forward progress stops and completed steps are rolled back. Idempotent.
    pub async fn cancel(&self, run: RunId, reason: &str) -> Result<SignalOutcome, EngineError> {
        self.cancel_as(run, reason, None).await
    }

    /// [`Engine::cancel`] asked for by the principal `by`, whom the journal names.
    pub async fn cancel_as(&self, run: RunId, reason: &str, by: Option<&str>) -> Result<SignalOutcome, EngineError> {
        self.store
            .cancel(run, reason, by, Timestamp::now())
            .await
            .map_err(|e| not_found(run, e))
    }

    /// The exact definition a run is pinned to (cached by hash).
    pub async fn pinned(&self, hash: &str) -> Result<Arc<Definition>, EngineError> {
        if let Some(d) = self.pinned.lock().ok().and_then(|m| m.get(hash).cloned()) {
            return Ok(d);
        }
        let source = self
            .store
            .definition_source(hash)
            .await?
            .ok_or_else(|| StoreError::Corrupt(format!("no stored definition with hash {hash}")))?;
        let def = Arc::new(workflow::parse(&format!("definition {hash}"), &source, &|a| {
            self.registry.contains(a)
        })?);
        if let Ok(mut m) = self.pinned.lock() {
            m.insert(hash.to_string(), def.clone());
        }
        Ok(def)
    }

    /// A run as it is stored now.
    pub async fn get_run(&self, run: RunId) -> Result<Option<store::RunRow>, EngineError> {
        Ok(self.store.get_run(run).await?)
    }

    /// A run's journal entries with `seq > after`, in order, at most `limit`.
    pub async fn journal(&self, run: RunId, after: i64, limit: u32) -> Result<Vec<store::JournalEntry>, EngineError> {
        Ok(self.store.journal(run, after, limit).await?)
    }

    /// Runs matching `filter`, newest first.
    pub async fn list_runs(&self, filter: &store::RunFilter) -> Result<Vec<store::RunRow>, EngineError> {
        Ok(self.store.list_runs(filter).await?)
    }

    /// The run a request id made, if any.
    pub async fn find_by_request_id(&self, request_id: &str) -> Result<Option<store::RunRow>, EngineError> {
        Ok(self.store.find_by_request_id(request_id).await?)
    }

    /// The name of the database backend ("sqlite" or "postgres").
    pub fn backend(&self) -> &'static str {
        self.store.backend()
    }

    /// Waits until a run is terminal (polling the store; for tests and the CLI).
    pub async fn wait_terminal(&self, run: RunId, timeout: Duration) -> Result<store::RunRow, EngineError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let row = self.store.get_run(run).await?.ok_or(EngineError::NotFound(run))?;
            if row.status.is_terminal() || tokio::time::Instant::now() >= deadline {
                return Ok(row);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn not_found(run: RunId, e: StoreError) -> EngineError {
    match e {
        StoreError::NotFound(_) => EngineError::NotFound(run),
        other => EngineError::Store(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A submit that starts its run on a worker which stopped in between (its queue closed)
    /// gives the lease back for any worker to claim, and the run does not stay known as executing
    /// here: its watchers read the journal rather than wait for a driver that never comes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_run_handed_to_a_stopped_worker_is_given_back_and_not_executing_here() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("tern.db").display());
        let store = store::open(&url).await.unwrap();
        let engine = Engine::with_registry(
            store.clone(),
            None,
            crate::steps::builtins(store.clone()),
            EngineConfig::default(),
        )
        .unwrap();
        let (runs, stopped) = tokio::sync::mpsc::unbounded_channel();
        drop(stopped);
        engine.set_local_worker(Some(LocalWorker {
            owner: "stopped".into(),
            slots: Arc::new(tokio::sync::Semaphore::new(1)),
            runs,
        }));
        let submitted = engine
            .submit(SubmitRequest {
                definition: "noop-6".into(),
                input: serde_json::json!({}),
                request_id: None,
                correlation_id: None,
                by: None,
            })
            .await
            .unwrap();
        let run = submitted.run.id;
        assert_eq!(
            submitted.run.lease_owner.as_deref(),
            Some("stopped"),
            "started in its submit's commit"
        );
        assert_eq!(engine.executing_correlation_id(run), None);
        assert!(!engine.watch_run(run).executing_here());
        let row = store.get_run(run).await.unwrap().unwrap();
        assert_eq!(row.lease_owner, None, "the lease was given back");
        assert_eq!(row.last_seq, submitted.run.last_seq, "nothing ran");
    }
}
