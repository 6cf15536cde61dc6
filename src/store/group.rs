//! Group commit, shared by the backends: a writer takes every checkpoint (and, where the
//! backend routes them here, submits, claims and lease updates) that queued up while the
//! previous batch was committing, and commits them together, so many runs share one fsync.
//! Nobody is answered before the commit returned. SQLite has one writer, on a thread of its own
//! ([`blocking_group_writer`]); PostgreSQL has a few async loops on one queue
//! ([`group_writer`]), whose small batches linger a moment for more while other runs are
//! committing too. The rows a batch writes are gathered here ([`BatchRows`], [`CasRow`]),
//! so a batch costs a fixed number of statements whatever its size.

use std::collections::HashSet;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use crate::domain::run::{Record, RunContext, RunState};
use crate::domain::{RunId, Timestamp};
use crate::store::projection::Projection;
use crate::store::{Checkpoint, CheckpointOutcome, Lease, NewRun, Result, RunRow, StoreError, Submitted};

/// Most jobs committed in one transaction.
pub(crate) const MAX_BATCH: usize = 512;

type Reply<T> = oneshot::Sender<Result<T>>;

/// Work for the writer, each answered after its batch commits.
pub(crate) enum WriteJob {
    Checkpoint(Box<Checkpoint>, Reply<CheckpointOutcome>),
    Submit(Box<NewRun>, Reply<Submitted>),
    Claim(ClaimJob, Reply<Vec<(RunRow, Lease)>>),
    Heartbeat(LeaseJob, Reply<()>),
    Release(LeaseJob, Reply<()>),
}

pub(crate) struct ClaimJob {
    pub owner: String,
    pub limit: u32,
    pub lease_ttl: Duration,
    pub now: Timestamp,
}

pub(crate) struct LeaseJob {
    pub run: RunId,
    pub lease: Lease,
    pub expires_at: Timestamp,
}

pub(crate) enum Outcome {
    Checkpoint(Result<CheckpointOutcome>),
    Submit(Box<Result<Submitted>>),
    Claim(Result<Vec<(RunRow, Lease)>>),
    Lease(Result<()>),
}

impl WriteJob {
    pub(crate) fn run_id(&self) -> Option<RunId> {
        match self {
            WriteJob::Checkpoint(cp, _) => Some(cp.run_id),
            WriteJob::Heartbeat(j, _) | WriteJob::Release(j, _) => Some(j.run),
            WriteJob::Submit(..) | WriteJob::Claim(..) => None,
        }
    }

    pub(crate) fn failed(&self, e: StoreError) -> Outcome {
        match self {
            WriteJob::Checkpoint(..) => Outcome::Checkpoint(Err(e)),
            WriteJob::Submit(..) => Outcome::Submit(Box::new(Err(e))),
            WriteJob::Claim(..) => Outcome::Claim(Err(e)),
            WriteJob::Heartbeat(..) | WriteJob::Release(..) => Outcome::Lease(Err(e)),
        }
    }

    pub(crate) fn answer(self, outcome: Outcome) {
        let mismatch = || StoreError::Corrupt("writer answered out of order".into());
        match (self, outcome) {
            (WriteJob::Checkpoint(_, r), Outcome::Checkpoint(o)) => drop(r.send(o)),
            (WriteJob::Submit(_, r), Outcome::Submit(o)) => drop(r.send(*o)),
            (WriteJob::Claim(_, r), Outcome::Claim(o)) => drop(r.send(o)),
            (WriteJob::Heartbeat(_, r) | WriteJob::Release(_, r), Outcome::Lease(o)) => drop(r.send(o)),
            (WriteJob::Checkpoint(_, r), _) => drop(r.send(Err(mismatch()))),
            (WriteJob::Submit(_, r), _) => drop(r.send(Err(mismatch()))),
            (WriteJob::Claim(_, r), _) => drop(r.send(Err(mismatch()))),
            (WriteJob::Heartbeat(_, r) | WriteJob::Release(_, r), _) => drop(r.send(Err(mismatch()))),
        }
    }
}

/// A backend's batch: every job in one transaction, answered in order. `known` holds the
/// definitions already stored; the committer adds the ones it stored once it committed.
#[async_trait]
pub(crate) trait Committer: Send + Sync + 'static {
    /// The backend's name, as metrics label it.
    const BACKEND: &'static str;
    async fn commit(&self, batch: &[&WriteJob], known: &mut HashSet<String>) -> Result<Vec<Outcome>>;
}

/// The writer loop of a backend with an async client; ends when every sender is gone.
/// Several loops may share one queue: each takes a batch, and while it commits the next one
/// gathers what queued meanwhile (the database overlaps their commits). A run has at most one
/// checkpoint queued at a time (its driver waits for each), so concurrent batches touch
/// different runs.
///
/// Loop `index` takes batches only while it is among the first `active` loops of its queue (a
/// job it holds for its next batch is always committed first).
pub(crate) async fn group_writer<C: Committer>(
    db: std::sync::Arc<C>,
    queue: std::sync::Arc<SharedQueue>,
    index: usize,
) {
    use std::sync::atomic::Ordering::SeqCst;
    // Definitions known to be stored (only added after their transaction committed).
    let mut known: HashSet<String> = HashSet::new();
    let mut held: Option<WriteJob> = None;
    let mut active = queue.active.clone();
    loop {
        if let (None, Some(active)) = (&held, active.as_mut()) {
            // Err: the count is gone with its store; the queue closes next.
            let _ = active.wait_for(|&n| index < n).await;
        }
        let batch = {
            let mut jobs = queue.jobs.lock().await;
            let first = match held.take() {
                Some(j) => j,
                None => match jobs.recv().await {
                    Some(j) => j,
                    None => return,
                },
            };
            let mut batch = vec![first];
            fill(&mut batch, &mut jobs, &mut held);
            // Overlapping commits pays only when each carries enough: while another loop is
            // committing, a small batch grows with what arrives until that commit ends.
            while batch.len() < OVERLAP_MIN && held.is_none() && queue.committing.load(SeqCst) > 0 {
                let done = queue.done.notified();
                tokio::pin!(done);
                done.as_mut().enable();
                if queue.committing.load(SeqCst) == 0 {
                    break;
                }
                tokio::select! {
                    _ = &mut done => break,
                    job = jobs.recv() => if !arrived(&mut batch, job, &mut jobs, &mut held) {
                        break;
                    },
                }
            }
            fill(&mut batch, &mut jobs, &mut held);
            // Under load (the last batch carried more than one job), a small batch lingers a
            // moment for more: a statement costs the database about as much for one job as for
            // ten (PostgreSQL's own commit_delay, done here). A lone workflow never waits.
            let until = queue.linger_until_now();
            if !queue.linger.is_zero() && batch.len() < until && held.is_none() && queue.last_batch.load(SeqCst) > 1 {
                let deadline = tokio::time::Instant::now() + queue.linger_now();
                while batch.len() < until && held.is_none() {
                    tokio::select! {
                        _ = tokio::time::sleep_until(deadline) => break,
                        job = jobs.recv() => if !arrived(&mut batch, job, &mut jobs, &mut held) {
                            break;
                        },
                    }
                }
            }
            queue.last_batch.store(batch.len(), SeqCst);
            batch
        };
        let committing = Committing::start(&queue);
        let refs: Vec<&WriteJob> = batch.iter().collect();
        let started = std::time::Instant::now();
        let committed = db.commit(&refs, &mut known).await;
        crate::telemetry::metrics::group_commit(C::BACKEND, refs.len(), started.elapsed());
        let outcomes = match committed {
            Ok(outcomes) => outcomes,
            Err(e) if refs.len() == 1 => vec![refs[0].failed(e)],
            Err(e) => {
                tracing::warn!(error = %e, size = refs.len(), "group commit failed; committing one by one");
                let mut each = Vec::with_capacity(refs.len());
                for job in &refs {
                    each.push(only(job, db.commit(&[*job], &mut known).await));
                }
                each
            }
        };
        drop(committing);
        answer_all(batch, outcomes);
    }
}

/// Below this many jobs, a batch waits for a commit under way rather than overlap it.
const OVERLAP_MIN: usize = 8;

/// The writer queue, shared by the loops of one process.
pub(crate) struct SharedQueue {
    jobs: tokio::sync::Mutex<mpsc::Receiver<WriteJob>>,
    /// Batches being committed now, by any loop.
    committing: std::sync::atomic::AtomicUsize,
    /// Told each time a commit ends.
    done: tokio::sync::Notify,
    /// Jobs in the last batch taken: more than one means other runs are committing too.
    last_batch: std::sync::atomic::AtomicUsize,
    /// How long a small batch waits for more under load (zero: never).
    linger: Duration,
    /// How many of the loops may take batches (None: all).
    active: Option<tokio::sync::watch::Receiver<usize>>,
    /// How many loops share the queue.
    loops: usize,
    /// How many runs this process's worker executes now, once it runs (see
    /// [`crate::store::ExecutingCount`]).
    executing: std::sync::RwLock<Option<crate::store::ExecutingCount>>,
}

/// A lingering batch stops waiting once it has this many jobs.
const LINGER_UNTIL: usize = 16;

/// A commit under way, counted in its queue until dropped (a panicking commit included, so the
/// other loops never wait on a commit that will not end).
struct Committing<'a>(&'a SharedQueue);

impl<'a> Committing<'a> {
    fn start(queue: &'a SharedQueue) -> Self {
        queue.committing.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Committing(queue)
    }
}

impl Drop for Committing<'_> {
    fn drop(&mut self) {
        self.0.committing.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        self.0.done.notify_waiters();
    }
}

impl SharedQueue {
    /// `loops` loops will share the queue; `active` (when given) says how many of them may take
    /// batches now.
    pub(crate) fn new(
        jobs: mpsc::Receiver<WriteJob>,
        linger: Duration,
        loops: usize,
        active: Option<tokio::sync::watch::Receiver<usize>>,
    ) -> std::sync::Arc<SharedQueue> {
        std::sync::Arc::new(SharedQueue {
            jobs: tokio::sync::Mutex::new(jobs),
            committing: Default::default(),
            done: Default::default(),
            last_batch: Default::default(),
            linger,
            active,
            loops: loops.max(1),
            executing: std::sync::RwLock::new(None),
        })
    }

    /// Tells the queue how many runs this process executes (None: no worker runs here).
    pub(crate) fn set_executing_count(&self, count: Option<crate::store::ExecutingCount>) {
        if let Ok(mut c) = self.executing.write() {
            *c = count;
        }
    }

    /// The loops that may take batches now.
    fn active_now(&self) -> usize {
        self.active
            .as_ref()
            .map_or(self.loops, |a| *a.borrow())
            .clamp(1, self.loops)
    }

    /// How many jobs a lingering batch waits for: [`LINGER_UNTIL`], or, in a process that
    /// commits only its share of the database's batches (other processes write to it too),
    /// three quarters of the runs its worker drives, up to [`LINGER_UNTIL`] times the loops
    /// over the active ones. Such a process sees only its share of the load, and its batches
    /// would otherwise stay at [`LINGER_UNTIL`] however many runs it drives: each server then
    /// commits its own small batches, and the database runs more transactions and WAL flushes
    /// for several servers than for one. Jobs come only from the runs driven here, so it never
    /// waits for more than most of them (the last few may be finishing, or starting).
    fn linger_until_now(&self) -> usize {
        let active = self.active_now();
        if active >= self.loops {
            return LINGER_UNTIL;
        }
        let executing = self
            .executing
            .read()
            .ok()
            .and_then(|d| d.as_ref().map(|f| f()))
            .unwrap_or(0);
        (executing * 3 / 4).clamp(LINGER_UNTIL, LINGER_UNTIL * self.loops / active)
    }

    /// How long a small batch lingers now: `linger` times the loops over the active ones. With
    /// fewer of its loops active (other processes commit to the same database, see
    /// `PgStore::commit_loops`), this process sees only its share of the load, so it lingers as
    /// much longer for a batch as large as one process alone would gather: each statement
    /// still carries about as many jobs, and the database runs no more statements for three
    /// processes than for one.
    fn linger_now(&self) -> Duration {
        let active = self.active_now();
        self.linger * u32::try_from(self.loops).unwrap_or(1) / u32::try_from(active).unwrap_or(1)
    }
}

/// The same loop for a backend whose client blocks (SQLite): it runs on a thread of its own.
pub(crate) fn blocking_group_writer(
    mut commit: impl FnMut(&[&WriteJob], &mut HashSet<String>) -> Result<Vec<Outcome>>,
    mut jobs: mpsc::Receiver<WriteJob>,
) {
    let mut known: HashSet<String> = HashSet::new();
    let mut held: Option<WriteJob> = None;
    loop {
        let first = match held.take() {
            Some(j) => j,
            None => match jobs.blocking_recv() {
                Some(j) => j,
                None => return,
            },
        };
        let mut batch = vec![first];
        fill(&mut batch, &mut jobs, &mut held);
        let refs: Vec<&WriteJob> = batch.iter().collect();
        let started = std::time::Instant::now();
        let committed = commit(&refs, &mut known);
        crate::telemetry::metrics::group_commit("sqlite", refs.len(), started.elapsed());
        let outcomes = match committed {
            Ok(outcomes) => outcomes,
            Err(e) if refs.len() == 1 => vec![refs[0].failed(e)],
            Err(e) => {
                tracing::warn!(error = %e, size = refs.len(), "group commit failed; committing one by one");
                refs.iter().map(|job| only(job, commit(&[*job], &mut known))).collect()
            }
        };
        answer_all(batch, outcomes);
    }
}

/// Adds to `batch` whatever has queued, up to [`MAX_BATCH`], without waiting.
fn fill(batch: &mut Vec<WriteJob>, jobs: &mut mpsc::Receiver<WriteJob>, held: &mut Option<WriteJob>) {
    let mut runs: HashSet<RunId> = batch.iter().filter_map(WriteJob::run_id).collect();
    while batch.len() < MAX_BATCH && held.is_none() {
        match jobs.try_recv() {
            Ok(job) => match job.run_id() {
                Some(id) if !runs.insert(id) => *held = Some(job),
                _ => batch.push(job),
            },
            Err(_) => break,
        }
    }
}

/// Adds `job` to `batch`, or, if the batch has a job for its run already, `held`s it for the
/// next batch (one compare-and-set per run and batch).
fn add(batch: &mut Vec<WriteJob>, job: WriteJob, held: &mut Option<WriteJob>) {
    match job.run_id() {
        Some(id) if batch.iter().any(|j| j.run_id() == Some(id)) => *held = Some(job),
        _ => batch.push(job),
    }
}

/// Adds a job the queue just gave to `batch` (see [`add`]) with whatever queued behind it;
/// false when the queue is closed.
fn arrived(
    batch: &mut Vec<WriteJob>,
    job: Option<WriteJob>,
    jobs: &mut mpsc::Receiver<WriteJob>,
    held: &mut Option<WriteJob>,
) -> bool {
    match job {
        Some(job) => {
            add(batch, job, held);
            fill(batch, jobs, held);
            true
        }
        None => false,
    }
}

/// The outcome of a job committed on its own.
fn only(job: &WriteJob, r: Result<Vec<Outcome>>) -> Outcome {
    match r {
        Ok(mut one) => one
            .pop()
            .unwrap_or_else(|| job.failed(StoreError::Corrupt("no outcome".into()))),
        Err(e) => job.failed(e),
    }
}

/// Answers every job of a committed batch, in order.
fn answer_all(batch: Vec<WriteJob>, outcomes: Vec<Outcome>) {
    for (job, outcome) in batch.into_iter().zip(outcomes) {
        job.answer(outcome);
    }
}

/// Rows the batch writes with one statement each, after the per-job work.
#[derive(Default)]
pub(crate) struct BatchRows<'a> {
    pub journal: Vec<JournalRow<'a>>,
    pub projections: Vec<ProjectionRow<'a>>,
    pub tracking: Vec<TrackingRow<'a>>,
}

pub(crate) struct JournalRow<'a> {
    pub run: String,
    pub seq: i64,
    pub kind: &'static str,
    pub record: &'a Record,
    pub at: i64,
}

pub(crate) struct ProjectionRow<'a> {
    pub id: String,
    pub status: Option<&'a str>,
    pub snapshot: Option<&'a str>,
    pub vm: Option<&'a str>,
    pub networks: Option<&'a str>,
    pub error: Option<&'a str>,
    pub started: bool,
    pub completed: bool,
    pub release_lock: bool,
    pub at: String,
}

pub(crate) struct TrackingRow<'a> {
    pub id: String,
    pub parent: String,
    pub operation: &'a str,
    pub status: &'static str,
    pub metadata: &'a Value,
    pub error: Option<&'a str>,
    pub correlation: &'a str,
    pub at: String,
}

impl<'a> BatchRows<'a> {
    pub(crate) fn add_journal(&mut self, run: RunId, first_seq: i64, records: &'a [Record], now: Timestamp) {
        let id = run.to_string();
        for (i, r) in records.iter().enumerate() {
            self.journal.push(JournalRow {
                run: id.clone(),
                seq: first_seq + i as i64,
                kind: r.kind(),
                record: r,
                at: now.0,
            });
        }
    }

    /// A run's journal rows and its projection (at most one per run and batch).
    pub(crate) fn add(
        &mut self,
        run: RunId,
        first_seq: i64,
        records: &'a [Record],
        projection: &'a Projection,
        now: Timestamp,
    ) {
        self.add_journal(run, first_seq, records, now);
        let id = run.to_string();
        let at = now.to_rfc3339();
        self.projections.push(ProjectionRow {
            id: id.clone(),
            status: projection.status.as_deref(),
            snapshot: projection.snapshot_name.as_deref(),
            vm: projection.destination_vm_id.as_deref(),
            networks: projection.network_mappings.as_deref(),
            error: projection.error_message.as_deref(),
            started: projection.started,
            completed: projection.completed,
            release_lock: projection.release_lock,
            at: at.clone(),
        });
        self.add_tracking(&id, projection, &at);
    }

    /// A submitted run's first journal row and its tracking rows: its projection is written
    /// with its job row.
    pub(crate) fn add_submitted(
        &mut self,
        run: RunId,
        record: &'a [Record],
        projection: &'a Projection,
        now: Timestamp,
    ) {
        self.add_journal(run, 1, record, now);
        self.add_tracking(&run.to_string(), projection, &now.to_rfc3339());
    }

    fn add_tracking(&mut self, id: &str, projection: &'a Projection, at: &str) {
        // Within one transition the last update of an operation wins, as it would row by row.
        // (A batch holds one projection per run, so duplicates can only come from this one.)
        for (i, t) in projection.tracking.iter().enumerate() {
            if projection.tracking[i + 1..]
                .iter()
                .any(|later| later.operation == t.operation)
            {
                continue;
            }
            self.tracking.push(TrackingRow {
                id: uuid::Uuid::now_v7().to_string(),
                parent: id.to_string(),
                operation: &t.operation,
                status: t.status,
                metadata: &t.metadata,
                error: t.error_message.as_deref(),
                correlation: &projection.correlation_id,
                at: at.to_string(),
            });
        }
    }
}

/// The `wake_at` a checkpoint's compare-and-set writes, in SQL both backends speak (`runs` is
/// the row, `v` the checkpoint's [`CasRow`]). The run is due at once when a cancel or signal
/// arrived while it was leased; else it wakes when its state says. A run that was due already
/// and stays due keeps its earlier time: a worker claims it just the same once its lease
/// expires, and the indexed column does not change, so PostgreSQL updates the row in place
/// (HOT) instead of adding an entry to every index of `runs` at each step.
pub(crate) fn cas_wake_at() -> String {
    let due = "(CASE WHEN (NOT v.terminal AND runs.cancel_pending AND NOT v.cancel) \
                      OR (v.wake_on_signal AND runs.signals_pending - v.signals > 0) THEN v.now \
                    ELSE v.wake END)";
    format!("CASE WHEN {due} <= v.now AND runs.wake_at <= {due} THEN runs.wake_at ELSE {due} END")
}

/// One checkpoint's compare-and-set inputs.
pub(crate) struct CasRow<'a> {
    pub id: String,
    pub token: i64,
    pub owner: &'a str,
    pub seq: i64,
    pub expect: &'static str,
    pub state: &'a RunState,
    pub status: &'static str,
    pub display: &'a str,
    pub step: Option<&'a str>,
    pub context: Option<&'a RunContext>,
    pub n: i64,
    pub wake: Option<i64>,
    pub wake_on_signal: bool,
    pub now: i64,
    pub release: bool,
    pub started: bool,
    pub terminal: bool,
    pub signals: i64,
    pub cancel: bool,
}

impl<'a> CasRow<'a> {
    pub(crate) fn of(cp: &'a Checkpoint) -> CasRow<'a> {
        CasRow {
            id: cp.run_id.to_string(),
            token: cp.lease.token,
            owner: &cp.lease.owner,
            seq: cp.expected_seq,
            expect: cp.expected_status.as_str(),
            state: &cp.state,
            status: cp.state.status().as_str(),
            display: &cp.display_status,
            step: cp.current_step.as_deref(),
            context: cp.context.as_ref(),
            n: cp.records.len() as i64,
            wake: cp.wake_at.map(|t| t.0),
            wake_on_signal: cp.wake_on_signal,
            now: cp.now.0,
            release: cp.release,
            started: cp.projection.started,
            terminal: cp.state.is_terminal(),
            signals: cp.consumed_signals.len() as i64,
            cancel: cp.consumed_cancel,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_with_a_share_of_the_loops_lingers_as_much_longer() {
        let ms = Duration::from_millis;
        let (_jobs, rx) = mpsc::channel(1);
        assert_eq!(
            SharedQueue::new(rx, ms(1), 3, None).linger_now(),
            ms(1),
            "no count: all loops"
        );
        let (count, active) = tokio::sync::watch::channel(3);
        let (_jobs, rx) = mpsc::channel(1);
        let queue = SharedQueue::new(rx, ms(1), 3, Some(active));
        assert_eq!(queue.linger_now(), ms(1), "alone on its database");
        count.send_replace(2);
        assert_eq!(
            queue.linger_now(),
            Duration::from_micros(1500),
            "two processes: 2 loops of 3"
        );
        count.send_replace(1);
        assert_eq!(queue.linger_now(), ms(3), "three or more processes: 1 loop of 3");
        count.send_replace(0);
        assert_eq!(queue.linger_now(), ms(3), "a count of 0 is taken as 1");
        let (_jobs, rx) = mpsc::channel(1);
        assert_eq!(
            SharedQueue::new(rx, Duration::ZERO, 3, None).linger_now(),
            Duration::ZERO
        );
    }

    #[test]
    fn a_process_with_a_share_of_the_loops_lingers_for_most_of_the_runs_it_drives() {
        let (count, active) = tokio::sync::watch::channel(3);
        let (_jobs, rx) = mpsc::channel(1);
        let queue = SharedQueue::new(rx, Duration::from_millis(1), 3, Some(active));
        let executing = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(50));
        queue.set_executing_count(Some({
            let executing = executing.clone();
            std::sync::Arc::new(move || executing.load(std::sync::atomic::Ordering::SeqCst))
        }));
        assert_eq!(
            queue.linger_until_now(),
            LINGER_UNTIL,
            "alone on its database: however many it drives"
        );
        count.send_replace(1);
        assert_eq!(
            queue.linger_until_now(),
            37,
            "three quarters of the 50 runs driven here"
        );
        executing.store(17, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(queue.linger_until_now(), LINGER_UNTIL, "never fewer than alone");
        executing.store(500, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(
            queue.linger_until_now(),
            3 * LINGER_UNTIL,
            "at most its share's multiple"
        );
        count.send_replace(2);
        assert_eq!(queue.linger_until_now(), 24, "two processes: 2 loops of 3");
        queue.set_executing_count(None);
        assert_eq!(queue.linger_until_now(), LINGER_UNTIL, "no worker here: as alone");
    }
}
