//! The PostgreSQL side of group commit (see [`crate::store::group`]): checkpoints and submits
//! of this process go through a few writer loops ([`super::WRITERS`]), so one statement (one
//! WAL flush) carries the checkpoints of many runs. Claims, heartbeats and releases stay on the
//! pool: PostgreSQL has row locks and `SKIP LOCKED`, so they never wait on the writer. Several
//! processes each have their own writers; the compare-and-set decides between them exactly as
//! it does for one.
//!
//! Every write is a single statement, atomic on its own, so it needs no transaction round trips.
//! A batch is one statement (one commit) holding:
//! - its checkpoints: the compare-and-set of every run (`UPDATE ... FROM unnest(...)`, one typed
//!   array per column) and, in data-modifying CTEs that take only the runs it matched, their
//!   journal rows, projections, tracking rows and consumed signals (a fenced checkpoint writes
//!   nothing);
//! - its submits without a lock: their `runs` and `failover_jobs` rows, journal and tracking
//!   rows, and the wake-up of other processes' workers.
//!
//! Each submit with a lock goes alone, at the same time on another connection, so a VM_BUSY
//! refusal is its own. Should a batch's statement fail, its checkpoints and its submits go
//! apart (each kind in one statement, then one by one), so one bad job does not fail the rest.

use std::collections::{HashMap, HashSet};
use std::sync::LazyLock;

use async_trait::async_trait;
use serde_json::Value;
use sqlx::types::Json;
use sqlx::{PgExecutor, PgPool, Row};

use super::{lock_conflict, run_from_row, RUN_COLUMNS};
use crate::domain::run::RunState;
use crate::store::group::{cas_wake_at, BatchRows, CasRow, Committer, JournalRow, Outcome, TrackingRow, WriteJob};
use crate::store::{Checkpoint, CheckpointOutcome, NewRun, Result, RunRow, StoreError, Submitted};

pub(super) struct PgCommitter {
    pub pool: PgPool,
    /// The NOTIFY channel that wakes the workers of every process.
    pub channel: String,
}

#[async_trait]
impl Committer for PgCommitter {
    const BACKEND: &'static str = "postgres";

    async fn commit(&self, batch: &[&WriteJob], known: &mut HashSet<String>) -> Result<Vec<Outcome>> {
        let mut cps: Vec<(usize, &Checkpoint)> = Vec::new();
        let mut free: Vec<(usize, &NewRun)> = Vec::new();
        let mut locked: Vec<(usize, &NewRun)> = Vec::new();
        let mut out: Vec<Option<Outcome>> = Vec::with_capacity(batch.len());
        for (i, job) in batch.iter().enumerate() {
            out.push(None);
            match job {
                WriteJob::Checkpoint(cp, _) => cps.push((i, &**cp)),
                WriteJob::Submit(run, _) if run.lock_key.is_some() => locked.push((i, &**run)),
                WriteJob::Submit(run, _) => free.push((i, &**run)),
                other @ (WriteJob::Claim(..) | WriteJob::Heartbeat(..) | WriteJob::Release(..)) => {
                    out[i] = Some(other.failed(StoreError::Internal("leases are not written by the PostgreSQL writer")))
                }
            }
        }
        // A definition first, in its own statement (runs reference it); once per process.
        for (_, run) in free.iter().chain(&locked) {
            if known.insert(run.definition_hash.clone()) {
                let stored = sqlx::query(
                    "INSERT INTO definitions (hash, name, source, created_at) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (hash) DO NOTHING",
                )
                .bind(&run.definition_hash)
                .bind(&run.definition)
                .bind(&run.definition_source)
                .bind(run.now.0)
                .execute(&self.pool)
                .await;
                if let Err(e) = stored {
                    known.remove(&run.definition_hash);
                    return Err(e.into());
                }
            }
        }
        // Each submit with a lock alone, at the same time as the rest, on another connection.
        let (written, alone) = tokio::join!(self.write_unlocked(&cps, &free), self.submit_each(&locked));
        for (i, o) in written.into_iter().chain(alone) {
            out[i] = Some(o);
        }
        Ok(out
            .into_iter()
            .zip(batch)
            .map(|(o, job)| o.unwrap_or_else(|| job.failed(StoreError::Corrupt("job left unanswered".into()))))
            .collect())
    }
}

impl PgCommitter {
    /// The checkpoints in one statement; if it fails, each alone (a failed statement wrote
    /// nothing), so one bad checkpoint does not fail the others.
    async fn checkpoint_all(&self, cps: &[(usize, &Checkpoint)]) -> Vec<(usize, Outcome)> {
        if cps.is_empty() {
            return vec![];
        }
        let all: Vec<&Checkpoint> = cps.iter().map(|(_, cp)| *cp).collect();
        match checkpoints(&self.pool, &all).await {
            Ok(matched) => cps
                .iter()
                .map(|(i, cp)| (*i, answer_checkpoint(&matched, cp)))
                .collect(),
            Err(e) if cps.len() == 1 => vec![(cps[0].0, Outcome::Checkpoint(Err(e)))],
            Err(e) => {
                tracing::warn!(error = %e, size = cps.len(), "checkpoint batch failed; committing one by one");
                let mut each = Vec::with_capacity(cps.len());
                for (i, cp) in cps {
                    each.push((
                        *i,
                        match checkpoints(&self.pool, &[*cp]).await {
                            Ok(matched) => answer_checkpoint(&matched, cp),
                            Err(e) => Outcome::Checkpoint(Err(e)),
                        },
                    ));
                }
                each
            }
        }
    }

    /// Checkpoints and submits without a lock touch different runs: one statement writes them all
    /// (one commit for the batch). Should it fail, or should the batch hold one kind only, each
    /// kind goes in a statement of its own, both at once on two connections.
    async fn write_unlocked(&self, cps: &[(usize, &Checkpoint)], free: &[(usize, &NewRun)]) -> Vec<(usize, Outcome)> {
        if !cps.is_empty() && !free.is_empty() {
            match self.write_together(cps, free).await {
                Ok(written) => return written,
                Err(e) => tracing::warn!(error = %e, checkpoints = cps.len(), submits = free.len(),
                    "batch statement failed; writing its checkpoints and submits apart"),
            }
        }
        let (checkpointed, submitted) = tokio::join!(self.checkpoint_all(cps), self.submit_free(free));
        checkpointed.into_iter().chain(submitted).collect()
    }

    /// Checkpoints and submits without a lock in one statement. Once it committed, every job is
    /// answered from it: an error here means nothing was written.
    async fn write_together(
        &self,
        cps: &[(usize, &Checkpoint)],
        free: &[(usize, &NewRun)],
    ) -> Result<Vec<(usize, Outcome)>> {
        let all: Vec<&Checkpoint> = cps.iter().map(|(_, cp)| *cp).collect();
        let runs: Vec<&NewRun> = free.iter().map(|(_, r)| *r).collect();
        let written = write(&self.pool, &all, &runs, &self.channel).await?;
        let mut out: Vec<(usize, Outcome)> = cps
            .iter()
            .map(|(i, cp)| (*i, answer_checkpoint(&written.checkpoints, cp)))
            .collect();
        let answers = answer_submits(&self.pool, &runs, written.created).await;
        out.extend(free.iter().map(|(i, _)| *i).zip(answers.into_iter().map(submitted)));
        Ok(out)
    }

    /// Submits without a lock in one statement (each alone if it fails).
    async fn submit_free(&self, free: &[(usize, &NewRun)]) -> Vec<(usize, Outcome)> {
        if free.is_empty() {
            return vec![];
        }
        let runs: Vec<&NewRun> = free.iter().map(|(_, r)| *r).collect();
        match submit_runs(&self.pool, &runs, &self.channel).await {
            Ok(results) => free
                .iter()
                .map(|(i, _)| *i)
                .zip(results.into_iter().map(submitted))
                .collect(),
            Err(e) if free.len() == 1 => vec![(free[0].0, submitted(Err(e)))],
            Err(e) => {
                tracing::warn!(error = %e, size = free.len(), "submit batch failed; submitting one by one");
                self.submit_each(free).await
            }
        }
    }

    /// Each submit in a statement of its own (a locked one's VM_BUSY refusal is its own).
    async fn submit_each(&self, runs: &[(usize, &NewRun)]) -> Vec<(usize, Outcome)> {
        let mut out = Vec::with_capacity(runs.len());
        for (i, run) in runs {
            out.push((*i, submitted(submit_one(&self.pool, run, &self.channel).await)));
        }
        out
    }
}

fn submitted(r: Result<Submitted>) -> Outcome {
    Outcome::Submit(Box::new(r))
}

async fn submit_one(pool: &PgPool, run: &NewRun, channel: &str) -> Result<Submitted> {
    submit_runs(pool, &[run], channel)
        .await?
        .pop()
        .unwrap_or_else(|| Err(StoreError::Corrupt("a submit without an outcome".into())))
}

/// One run to create, as the submit statement reads it: the `runs` row and the
/// `failover_jobs` row with its projection already applied (a row cannot be updated in the
/// statement that inserts it).
#[derive(serde::Serialize)]
struct SubmitRow<'a> {
    id: String,
    definition: &'a str,
    hash: &'a str,
    request_id: Option<&'a str>,
    correlation_id: &'a str,
    status: &'static str,
    display: &'a str,
    step: Option<&'a str>,
    state: &'a RunState,
    input: &'a Value,
    last_seq: i64,
    now: i64,
    token: i64,
    owner: Option<&'a str>,
    lease_expires: Option<i64>,
    started: Option<i64>,
    vm_id: &'a str,
    vm_name: Option<&'a str>,
    job_type: &'a str,
    job_status: &'a str,
    snapshot: Option<&'a str>,
    vm: Option<&'a str>,
    error: Option<&'a str>,
    source_vm_spec: Option<String>,
    network_mappings: Option<String>,
    lock_key: Option<&'a str>,
    job_started: bool,
    job_completed: bool,
    trace_parent: Option<&'a str>,
}

impl<'a> SubmitRow<'a> {
    fn of(run: &'a NewRun, pending: &'a RunState) -> SubmitRow<'a> {
        let (state, step, last_seq) = match &run.start {
            Some(s) => (&s.state, s.current_step.as_deref(), 1 + s.records.len() as i64),
            None => (pending, None, 1),
        };
        let p = &run.projection;
        SubmitRow {
            id: run.id.to_string(),
            definition: &run.definition,
            hash: &run.definition_hash,
            request_id: run.request_id.as_deref(),
            correlation_id: &run.correlation_id,
            status: state.status().as_str(),
            display: &run.display_status,
            step,
            state,
            input: &run.input,
            last_seq,
            now: run.now.0,
            token: run.start.as_ref().map_or(0, |s| s.lease.token),
            owner: run.start.as_ref().map(|s| s.lease.owner.as_str()),
            lease_expires: run.start.as_ref().map(|s| s.lease_expires_at.0),
            started: run.start.as_ref().map(|_| run.now.0),
            vm_id: &run.subject.vm_id,
            vm_name: run.subject.vm_name.as_deref(),
            job_type: &run.job_type,
            job_status: p.status.as_deref().unwrap_or(&run.display_status),
            snapshot: p.snapshot_name.as_deref(),
            vm: p.destination_vm_id.as_deref(),
            error: p.error_message.as_deref(),
            source_vm_spec: run.subject.source_vm_spec.clone(),
            network_mappings: p.network_mappings.clone(),
            lock_key: run.lock_key.as_deref(),
            job_started: p.started,
            job_completed: p.completed,
            trace_parent: run.trace_parent.as_deref(),
        }
    }
}

/// A checkpoint's answer: what the statement returned for its run, or fenced if it matched
/// nothing (and so wrote nothing).
fn answer_checkpoint(matched: &HashMap<String, CheckpointOutcome>, cp: &Checkpoint) -> Outcome {
    match matched.get(&cp.run_id.to_string()) {
        Some(o) => Outcome::Checkpoint(Ok(*o)),
        None => Outcome::Checkpoint(Err(StoreError::Fenced { run: cp.run_id })),
    }
}

/// The CTEs that create runs (`ins`, with [`RUN_COLUMNS`]) and their `failover_jobs` rows from
/// the JSON array parameter `$json` of [`SubmitRow`]s. A run whose request id is taken is not
/// inserted (and is not in `ins`).
fn submit_ctes(json: u8) -> String {
    let at = |field: &str| format!("to_timestamp((e->>'{field}')::bigint / 1000.0)");
    format!(
        "sub AS (SELECT e FROM jsonb_array_elements(${json}::jsonb) AS e), \
         ins AS (INSERT INTO runs (id, definition, definition_hash, request_id, correlation_id, status, display_status, \
                     current_step, state, input, context, last_seq, wake_at, fencing_token, lease_owner, \
                     lease_expires_at, created_at, updated_at, started_at, trace_parent) \
             SELECT (e->>'id')::uuid, e->>'definition', e->>'hash', e->>'request_id', e->>'correlation_id', \
                    e->>'status', e->>'display', e->>'step', e->'state', e->'input', '{{}}'::jsonb, \
                    (e->>'last_seq')::bigint, (e->>'now')::bigint, (e->>'token')::bigint, e->>'owner', \
                    (e->>'lease_expires')::bigint, (e->>'now')::bigint, (e->>'now')::bigint, (e->>'started')::bigint, \
                    e->>'trace_parent' \
             FROM sub ON CONFLICT (request_id) DO NOTHING RETURNING {RUN_COLUMNS}), \
         jobs AS (INSERT INTO failover_jobs (job_id, vm_id, vm_name, job_type, status, linstor_snapshot_name, \
                     destination_vm_id, source_vm_spec, network_mappings, error_message, correlation_id, created_at, \
                     updated_at, started_at, completed_at, lock_key) \
             SELECT e->>'id', e->>'vm_id', e->>'vm_name', e->>'job_type', e->>'job_status', e->>'snapshot', e->>'vm', \
                    e->>'source_vm_spec', e->>'network_mappings', e->>'error', e->>'correlation_id', {now}, {now}, \
                    CASE WHEN (e->>'job_started')::boolean THEN {now} END, \
                    CASE WHEN (e->>'job_completed')::boolean THEN {now} END, e->>'lock_key' \
             FROM sub WHERE (e->>'id')::uuid IN (SELECT id FROM ins))",
        now = at("now"),
    )
}

/// The submits' rows: the [`SubmitRow`]s (as JSON), and their journal and tracking rows.
fn submit_rows<'a>(runs: &[&'a NewRun], pending: &'a RunState, rows: &mut BatchRows<'a>) -> Result<String> {
    let new: Vec<SubmitRow> = runs.iter().map(|r| SubmitRow::of(r, pending)).collect();
    for run in runs {
        rows.add_submitted(run.id, std::slice::from_ref(&run.record), &run.projection, run.now);
        if let Some(start) = &run.start {
            rows.add_journal(run.id, 2, &start.records, run.now);
        }
    }
    json(&new)
}

/// Creates runs in one statement: their `runs` rows (idempotent by request id: a run whose
/// request id is taken is answered with the existing run), `failover_jobs` rows, journal and
/// tracking rows, and a wake-up for the workers of every process when a run is left for them to
/// claim (one started at submit is leased already). One answer per run, in order.
async fn submit_runs(pool: &PgPool, runs: &[&NewRun], channel: &str) -> Result<Vec<Result<Submitted>>> {
    let pending = RunState::Pending;
    let mut rows = BatchRows::default();
    let new = submit_rows(runs, &pending, &mut rows)?;
    // The statement's text is built once per process.
    static SQL: LazyLock<String> = LazyLock::new(|| {
        format!(
            "WITH {submits}, {journal}, {tracking} \
             SELECT {RUN_COLUMNS}, (CASE WHEN lease_owner IS NULL THEN pg_notify($15, '') END) IS NULL AS woke FROM ins",
            submits = submit_ctes(1),
            journal = journal_cte(2, "ins"),
            tracking = tracking_cte(7, "ins"),
        )
    });
    let inserted = sqlx::query(SQL.as_str()).bind(new);
    let inserted = bind_tracking(bind_journal(inserted, &rows.journal), &rows.tracking)
        .bind(channel)
        .fetch_all(pool)
        .await
        .map_err(|e| match runs {
            [one] => lock_conflict(e, &one.lock_key),
            _ => StoreError::Database(e),
        })?;
    let mut created: HashMap<uuid::Uuid, RunRow> = HashMap::with_capacity(inserted.len());
    for row in &inserted {
        let run = run_from_row(row)?;
        created.insert(run.id.0, run);
    }
    Ok(answer_submits(pool, runs, created).await)
}

/// Each submit's answer once its statement committed: the run it created, or, where its
/// request id was taken, the run that has it (one more read, only then). Should that read fail,
/// those submits are answered with a retryable error (submitting again with the request id
/// finds the run).
async fn answer_submits(
    pool: &PgPool,
    runs: &[&NewRun],
    mut created: HashMap<uuid::Uuid, RunRow>,
) -> Vec<Result<Submitted>> {
    let taken: Vec<&str> = runs
        .iter()
        .filter(|r| !created.contains_key(&r.id.0))
        .filter_map(|r| r.request_id.as_deref())
        .collect();
    let mut existing: HashMap<String, RunRow> = HashMap::new();
    let mut lookup_failed: Option<String> = None;
    if !taken.is_empty() {
        let found = sqlx::query(&format!("SELECT {RUN_COLUMNS} FROM runs WHERE request_id = ANY($1)"))
            .bind(&taken)
            .fetch_all(pool)
            .await;
        match found {
            Ok(rows) => {
                for row in &rows {
                    match run_from_row(row) {
                        Ok(run) => {
                            if let Some(req) = run.request_id.clone() {
                                existing.insert(req, run);
                            }
                        }
                        Err(e) => lookup_failed = Some(e.to_string()),
                    }
                }
            }
            Err(e) => lookup_failed = Some(e.to_string()),
        }
    }
    runs.iter()
        .map(|r| match created.remove(&r.id.0) {
            Some(run) => Ok(Submitted {
                run,
                created: true,
                journal: r.journal(),
            }),
            None => match (
                r.request_id.as_ref().and_then(|req| existing.get(req).cloned()),
                &lookup_failed,
            ) {
                (Some(run), _) => Ok(Submitted {
                    run,
                    created: false,
                    journal: Vec::new(),
                }),
                (None, Some(e)) => Err(StoreError::Database(sqlx::Error::Io(std::io::Error::other(format!(
                    "reading the run that holds request id {:?}: {e}",
                    r.request_id
                ))))),
                (None, None) => Err(StoreError::Corrupt(format!(
                    "run {} was neither created nor found",
                    r.id
                ))),
            },
        })
        .collect()
}

/// What one batch statement wrote: the outcome of each checkpoint it matched (by run id), and
/// the runs it created.
struct Written {
    checkpoints: HashMap<String, CheckpointOutcome>,
    created: HashMap<uuid::Uuid, RunRow>,
}

/// The checkpoints of a batch in one statement (see [`write`]).
async fn checkpoints(db: impl PgExecutor<'_>, cps: &[&Checkpoint]) -> Result<HashMap<String, CheckpointOutcome>> {
    Ok(write(db, cps, &[], "").await?.checkpoints)
}

/// Every checkpoint of a batch in one statement: the compare-and-set, then (only for the runs
/// it matched) the journal rows, projections, tracking rows and consumed signals. Returns the
/// outcome of each run it matched; a run it did not match was fenced and nothing of it was
/// written. With `submits` (none of them locked), the same statement creates those runs as
/// [`submit_runs`] does: a batch is then one commit.
///
/// Every column goes as a typed array (`unnest`), in PostgreSQL's binary format: nothing to
/// parse but the JSON columns themselves. `runs.id = ANY($1)` lets the planner find the rows by
/// primary key (the writer's connections have sequential scans off, see `PgStore::connect`).
async fn write(db: impl PgExecutor<'_>, cps: &[&Checkpoint], submits: &[&NewRun], channel: &str) -> Result<Written> {
    let mut rows = BatchRows::default();
    for cp in cps {
        rows.add(cp.run_id, cp.expected_seq + 1, &cp.records, &cp.projection, cp.now);
    }
    let pending = RunState::Pending;
    let new = submit_rows(submits, &pending, &mut rows)?;
    let cas: Vec<CasRow> = cps.iter().map(|cp| CasRow::of(cp)).collect();
    let col = |f: fn(&CasRow) -> i64| cas.iter().map(f).collect::<Vec<i64>>();
    let flag = |f: fn(&CasRow) -> bool| cas.iter().map(f).collect::<Vec<bool>>();
    let consumed: Vec<(i64, uuid::Uuid, i64)> = cps
        .iter()
        .flat_map(|cp| cp.consumed_signals.iter().map(|&id| (id, cp.run_id.0, cp.now.0)))
        .collect();
    let p = &rows.projections;
    // The statement's text is built once per process, in a form for each set of parts the batch
    // has rows for: a part with no rows is left out (PostgreSQL would still set up and run its
    // update or insert for nothing, at every batch). Its parameters are bound all the same,
    // empty, so that every form numbers them alike.
    const SUBMITS: usize = 1;
    const PROJECTIONS: usize = 2;
    const TRACKING: usize = 4;
    const CONSUMED: usize = 8;
    static SQL: LazyLock<Vec<String>> = LazyLock::new(|| (0..16).map(write_sql).collect());
    fn write_sql(parts: usize) -> String {
        let submits = parts & SUBMITS != 0;
        let written = if submits {
            "(SELECT id FROM cas UNION ALL SELECT id FROM ins) AS written"
        } else {
            "cas"
        };
        // A checkpoint's row, or (with submits) a created run's, never both: FULL JOIN ON false
        // is a union of rows of two shapes, each column keeping its type.
        let (submits, select) = if submits {
            (
                format!(", {}", submit_ctes(46)),
                "SELECT c.id::text AS cp_id, c.last_seq AS cp_seq, c.signals_pending AS cp_signals, \
                 c.cancel_pending AS cp_cancel, i.*, \
                 (CASE WHEN i.id IS NOT NULL AND i.lease_owner IS NULL THEN pg_notify($47, '') END) IS NULL AS woke \
                 FROM cas c FULL JOIN ins i ON false"
                    .to_string(),
            )
        } else {
            (
                String::new(),
                "SELECT id::text AS cp_id, last_seq AS cp_seq, signals_pending AS cp_signals, \
                 cancel_pending AS cp_cancel FROM cas"
                    .to_string(),
            )
        };
        format!(
            "WITH cas AS (UPDATE runs SET state = v.state, status = v.status, display_status = v.display, \
             current_step = v.step, context = COALESCE(v.context, runs.context), last_seq = runs.last_seq + v.n, \
             wake_at = {wake}, \
             lease_owner = CASE WHEN v.release THEN NULL ELSE runs.lease_owner END, \
             lease_expires_at = CASE WHEN v.release THEN NULL ELSE runs.lease_expires_at END, \
             signals_pending = runs.signals_pending - v.signals, \
             cancel_pending = CASE WHEN v.cancel THEN FALSE ELSE runs.cancel_pending END, \
             updated_at = v.now, started_at = COALESCE(runs.started_at, CASE WHEN v.started THEN v.now END), \
             completed_at = COALESCE(runs.completed_at, CASE WHEN v.terminal THEN v.now END) \
         FROM unnest($1::uuid[], $2::int8[], $3::text[], $4::int8[], $5::text[], $6::jsonb[], $7::text[], \
                     $8::text[], $9::text[], $10::jsonb[], $11::int8[], $12::int8[], $13::bool[], $14::int8[], \
                     $15::bool[], $16::bool[], $17::bool[], $18::int8[], $19::bool[]) \
              AS v(id, token, owner, seq, expect, state, status, display, step, context, n, wake, wake_on_signal, \
                   now, release, started, terminal, signals, cancel) \
         WHERE runs.id = ANY($1) AND runs.id = v.id AND runs.fencing_token = v.token \
           AND runs.lease_owner = v.owner AND runs.last_seq = v.seq AND runs.status = v.expect \
           AND (NOT v.terminal OR v.cancel OR NOT runs.cancel_pending) \
         RETURNING runs.id, runs.last_seq, runs.signals_pending, runs.cancel_pending){submits}, \
         {journal}{projections}{tracking}{consumed} \
         {select}",
            wake = cas_wake_at(),
            journal = journal_cte(20, written),
            projections = if parts & PROJECTIONS != 0 { PROJECTIONS_CTE } else { "" },
            tracking = if parts & TRACKING != 0 {
                format!(", {}", tracking_cte(35, written))
            } else {
                String::new()
            },
            consumed = if parts & CONSUMED != 0 { CONSUMED_CTE } else { "" },
        )
    }
    const PROJECTIONS_CTE: &str =
        ", projections AS (UPDATE failover_jobs SET status = COALESCE(v.status, failover_jobs.status), \
             linstor_snapshot_name = COALESCE(v.snapshot, failover_jobs.linstor_snapshot_name), \
             destination_vm_id = COALESCE(v.vm, failover_jobs.destination_vm_id), \
             network_mappings = COALESCE(v.networks, failover_jobs.network_mappings), \
             error_message = COALESCE(v.error, failover_jobs.error_message), \
             started_at = CASE WHEN v.started AND failover_jobs.started_at IS NULL THEN v.at::timestamptz \
                               ELSE failover_jobs.started_at END, \
             completed_at = COALESCE(failover_jobs.completed_at, CASE WHEN v.completed THEN v.at::timestamptz END), \
             lock_key = CASE WHEN v.release_lock THEN NULL ELSE failover_jobs.lock_key END, \
             updated_at = v.at::timestamptz \
             FROM unnest($25::text[], $26::text[], $27::text[], $28::text[], $29::text[], $30::bool[], $31::bool[], \
                         $32::text[], $33::bool[], $34::text[]) \
                  AS v(id, status, snapshot, vm, error, started, completed, at, release_lock, networks) \
             WHERE failover_jobs.job_id = v.id AND v.id::uuid IN (SELECT id FROM cas))";
    const CONSUMED_CTE: &str = ", consumed AS (UPDATE signals SET consumed_at = c.now \
             FROM unnest($43::int8[], $44::uuid[], $45::int8[]) AS c(id, run, now) \
             WHERE signals.id = c.id AND signals.consumed_at IS NULL AND c.run IN (SELECT id FROM cas))";
    let part = |has: bool, part: usize| if has { part } else { 0 };
    let parts = part(!submits.is_empty(), SUBMITS)
        | part(!p.is_empty(), PROJECTIONS)
        | part(!rows.tracking.is_empty(), TRACKING)
        | part(!consumed.is_empty(), CONSUMED);
    let q = sqlx::query(SQL[parts].as_str())
        .bind(cps.iter().map(|cp| cp.run_id.0).collect::<Vec<uuid::Uuid>>())
        .bind(col(|c| c.token))
        .bind(cas.iter().map(|c| c.owner).collect::<Vec<&str>>())
        .bind(col(|c| c.seq))
        .bind(cas.iter().map(|c| c.expect).collect::<Vec<&str>>())
        .bind(cas.iter().map(|c| Json(c.state)).collect::<Vec<_>>())
        .bind(cas.iter().map(|c| c.status).collect::<Vec<&str>>())
        .bind(cas.iter().map(|c| c.display).collect::<Vec<&str>>())
        .bind(cas.iter().map(|c| c.step).collect::<Vec<Option<&str>>>())
        .bind(cas.iter().map(|c| c.context.map(Json)).collect::<Vec<_>>())
        .bind(col(|c| c.n))
        .bind(cas.iter().map(|c| c.wake).collect::<Vec<Option<i64>>>())
        .bind(flag(|c| c.wake_on_signal))
        .bind(col(|c| c.now))
        .bind(flag(|c| c.release))
        .bind(flag(|c| c.started))
        .bind(flag(|c| c.terminal))
        .bind(col(|c| c.signals))
        .bind(flag(|c| c.cancel));
    let q = bind_journal(q, &rows.journal)
        .bind(p.iter().map(|r| r.id.as_str()).collect::<Vec<&str>>())
        .bind(p.iter().map(|r| r.status).collect::<Vec<Option<&str>>>())
        .bind(p.iter().map(|r| r.snapshot).collect::<Vec<Option<&str>>>())
        .bind(p.iter().map(|r| r.vm).collect::<Vec<Option<&str>>>())
        .bind(p.iter().map(|r| r.error).collect::<Vec<Option<&str>>>())
        .bind(p.iter().map(|r| r.started).collect::<Vec<bool>>())
        .bind(p.iter().map(|r| r.completed).collect::<Vec<bool>>())
        .bind(p.iter().map(|r| r.at.as_str()).collect::<Vec<&str>>())
        .bind(p.iter().map(|r| r.release_lock).collect::<Vec<bool>>())
        .bind(p.iter().map(|r| r.networks).collect::<Vec<Option<&str>>>());
    let q = bind_tracking(q, &rows.tracking)
        .bind(consumed.iter().map(|c| c.0).collect::<Vec<i64>>())
        .bind(consumed.iter().map(|c| c.1).collect::<Vec<uuid::Uuid>>())
        .bind(consumed.iter().map(|c| c.2).collect::<Vec<i64>>());
    let q = if submits.is_empty() {
        q
    } else {
        q.bind(new).bind(channel)
    };
    let mut written = Written {
        checkpoints: HashMap::with_capacity(cps.len()),
        created: HashMap::with_capacity(submits.len()),
    };
    for r in q.fetch_all(db).await? {
        match r.try_get::<Option<String>, _>("cp_id")? {
            Some(id) => {
                let outcome = CheckpointOutcome {
                    last_seq: r.try_get("cp_seq")?,
                    signals_pending: r.try_get("cp_signals")?,
                    cancel_pending: r.try_get("cp_cancel")?,
                };
                written.checkpoints.insert(id, outcome);
            }
            None => {
                let run = run_from_row(&r)?;
                written.created.insert(run.id.0, run);
            }
        }
    }
    Ok(written)
}

fn json<T: serde::Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| StoreError::Corrupt(format!("encoding a batch: {e}")))
}

type PgQuery<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

/// A CTE inserting the journal rows of array parameters `$first`.. (five: see
/// [`bind_journal`]) whose runs are in `runs` (the CTE of the runs this statement wrote).
fn journal_cte(first: u8, runs: &str) -> String {
    let [a, b, c, d, e] = [0, 1, 2, 3, 4].map(|i| first + i);
    format!(
        "journal_rows AS (INSERT INTO journal (run_id, seq, kind, record, at) \
         SELECT j.run::uuid, j.seq, j.kind, j.record, j.at \
         FROM unnest(${a}::text[], ${b}::int8[], ${c}::text[], ${d}::jsonb[], ${e}::int8[]) AS j(run, seq, kind, record, at) \
         WHERE j.run::uuid IN (SELECT id FROM {runs}))"
    )
}

/// Binds the journal rows as the five arrays [`journal_cte`] reads.
fn bind_journal<'q>(q: PgQuery<'q>, rows: &'q [JournalRow<'q>]) -> PgQuery<'q> {
    q.bind(rows.iter().map(|r| r.run.as_str()).collect::<Vec<&str>>())
        .bind(rows.iter().map(|r| r.seq).collect::<Vec<i64>>())
        .bind(rows.iter().map(|r| r.kind).collect::<Vec<&str>>())
        .bind(rows.iter().map(|r| Json(r.record)).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.at).collect::<Vec<i64>>())
}

/// A CTE upserting the `job_tracking` rows of array parameters `$first`.. (eight: see
/// [`bind_tracking`]) whose runs are in `runs`. A row's correlation id is its run's, written
/// when the row is created.
fn tracking_cte(first: u8, runs: &str) -> String {
    let [a, b, c, d, e, f, g, h] = [0, 1, 2, 3, 4, 5, 6, 7].map(|i| first + i);
    format!(
        "tracking AS (INSERT INTO job_tracking (id, parent_job_id, operation, status, metadata, error_message, \
                                             correlation_id, created_at, updated_at) \
         SELECT t.id, t.parent, t.operation, t.status, t.metadata, t.error, t.correlation, t.at::timestamptz, \
                t.at::timestamptz \
         FROM unnest(${a}::text[], ${b}::text[], ${c}::text[], ${d}::text[], ${e}::jsonb[], ${f}::text[], ${g}::text[], \
                     ${h}::text[]) \
              AS t(id, parent, operation, status, metadata, error, at, correlation) \
         WHERE t.parent::uuid IN (SELECT id FROM {runs}) \
         ON CONFLICT (parent_job_id, operation) DO UPDATE SET status = excluded.status, \
             metadata = excluded.metadata, error_message = excluded.error_message, updated_at = excluded.updated_at)"
    )
}

/// Binds the tracking rows as the eight arrays [`tracking_cte`] reads.
fn bind_tracking<'q>(q: PgQuery<'q>, rows: &'q [TrackingRow<'q>]) -> PgQuery<'q> {
    q.bind(rows.iter().map(|r| r.id.as_str()).collect::<Vec<&str>>())
        .bind(rows.iter().map(|r| r.parent.as_str()).collect::<Vec<&str>>())
        .bind(rows.iter().map(|r| r.operation).collect::<Vec<&str>>())
        .bind(rows.iter().map(|r| r.status).collect::<Vec<&str>>())
        .bind(rows.iter().map(|r| Json(r.metadata)).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.error).collect::<Vec<Option<&str>>>())
        .bind(rows.iter().map(|r| r.at.as_str()).collect::<Vec<&str>>())
        .bind(rows.iter().map(|r| r.correlation).collect::<Vec<&str>>())
}
