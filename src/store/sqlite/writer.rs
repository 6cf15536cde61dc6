//! The SQLite side of group commit (see [`crate::store::group`]). SQLite has one writer at a
//! time, so every write of the hot path goes through one writer: checkpoints, submits, claims,
//! heartbeats and releases, and no write ever waits on the busy timeout.
//!
//! The writer is a thread of its own with its own connection: a batch runs start to finish on
//! it, with no hop between threads per statement (a pooled async connection hands every
//! statement and every returned row to its worker thread and back, and those wake-ups cost
//! more than the statements). Readers keep using the pool.
//!
//! A batch: one compare-and-set over all its checkpoints (`WITH v AS (VALUES ...) UPDATE runs
//! ... FROM v`; a checkpoint it did not match was fenced and writes nothing), the submits one by
//! one (a locked one under a savepoint, so a VM_BUSY failure is undone alone), then one insert
//! of every journal row, one update of every projection, and the claims last, so a run
//! submitted in the batch can be claimed in it. Multi-row statements come in a few fixed row
//! counts ([`CHUNKS`]) and are prepared once.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use rusqlite::{Connection, OpenFlags, Statement, ToSql, Transaction, TransactionBehavior};
use tokio::sync::mpsc;

use super::{run_from_row, BUSY_TIMEOUT, RUN_COLUMNS};
use crate::domain::run::RunState;
use crate::store::group::{blocking_group_writer, cas_wake_at, BatchRows, CasRow, ClaimJob, Outcome, WriteJob};
use crate::store::{Checkpoint, CheckpointOutcome, Lease, NewRun, Result, RunRow, StoreError, Submitted};

/// Row counts a multi-row statement is prepared for: a batch is cut into chunks of these sizes,
/// so only a handful of distinct statements are ever prepared (and cached). Values are bound as
/// parameters: parsing a JSON document per row cost more than the statements.
const CHUNKS: [usize; 4] = [64, 16, 4, 1];

/// Opens the writer's connection to the (migrated) database at `path` and starts its thread,
/// which commits `jobs` until every sender is gone.
pub(super) fn spawn(path: &Path, jobs: mpsc::Receiver<WriteJob>) -> Result<()> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI,
    )?;
    // The same durability as the pool's connections: WAL, and fsync at every commit.
    let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Config(format!(
            "{}: journal_mode is {mode}, not WAL",
            path.display()
        )));
    }
    conn.pragma_update(None, "synchronous", "FULL")?;
    let sync: i64 = conn.pragma_query_value(None, "synchronous", |r| r.get(0))?;
    if sync != 2 {
        return Err(StoreError::Config(format!(
            "{}: the writer's synchronous is {sync}, not FULL (2)",
            path.display()
        )));
    }
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.set_prepared_statement_cache_capacity(64);
    std::thread::Builder::new()
        .name("tern-sqlite-writer".into())
        .spawn(move || {
            let mut conn = conn;
            blocking_group_writer(|batch, known| commit_batch(&mut conn, batch, known), jobs)
        })
        .map_err(|e| StoreError::Config(format!("starting the SQLite writer thread: {e}")))?;
    Ok(())
}

fn chunked<T>(rows: &[T]) -> Vec<&[T]> {
    let mut out = Vec::new();
    let mut rest = rows;
    while !rest.is_empty() {
        let k = CHUNKS.iter().copied().find(|&k| k <= rest.len()).unwrap_or(1);
        let (chunk, more) = rest.split_at(k);
        out.push(chunk);
        rest = more;
    }
    out
}

/// `(?, ?, ?), (?, ?, ?)`: `rows` rows of `cols` placeholders.
fn placeholders(cols: usize, rows: usize) -> String {
    let row = format!("({})", vec!["?"; cols].join(", "));
    vec![row; rows].join(", ")
}

fn text<T: serde::Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| StoreError::Corrupt(format!("encoding: {e}")))
}

/// Binds parameters in order to a prepared statement.
struct Binder<'s, 'c> {
    stmt: &'s mut Statement<'c>,
    next: usize,
}

impl<'s, 'c> Binder<'s, 'c> {
    fn new(stmt: &'s mut Statement<'c>) -> Self {
        Binder { stmt, next: 1 }
    }

    fn bind(&mut self, v: impl ToSql) -> Result<&mut Self> {
        self.stmt.raw_bind_parameter(self.next, v)?;
        self.next += 1;
        Ok(self)
    }
}

/// The batch's journal rows, projections and tracking rows: one statement per chunk.
fn write_rows(tx: &Transaction, rows: &BatchRows<'_>) -> Result<()> {
    for chunk in chunked(&rows.journal) {
        let sql = format!(
            "INSERT INTO journal (run_id, seq, kind, record, at) VALUES {}",
            placeholders(5, chunk.len())
        );
        let mut stmt = tx.prepare_cached(&sql)?;
        let mut b = Binder::new(&mut stmt);
        for r in chunk {
            b.bind(&r.run)?
                .bind(r.seq)?
                .bind(r.kind)?
                .bind(text(r.record)?)?
                .bind(r.at)?;
        }
        stmt.raw_execute()?;
    }
    for chunk in chunked(&rows.projections) {
        let sql = format!(
            "WITH v(id, status, snapshot, vm, error, started, completed, at, release_lock, networks) AS (VALUES {}) \
             UPDATE failover_jobs SET status = COALESCE(v.status, failover_jobs.status), \
             linstor_snapshot_name = COALESCE(v.snapshot, failover_jobs.linstor_snapshot_name), \
             destination_vm_id = COALESCE(v.vm, failover_jobs.destination_vm_id), \
             network_mappings = COALESCE(v.networks, failover_jobs.network_mappings), \
             error_message = COALESCE(v.error, failover_jobs.error_message), \
             started_at = CASE WHEN v.started AND failover_jobs.started_at IS NULL THEN v.at ELSE failover_jobs.started_at END, \
             completed_at = COALESCE(failover_jobs.completed_at, CASE WHEN v.completed THEN v.at END), \
             lock_key = CASE WHEN v.release_lock THEN NULL ELSE failover_jobs.lock_key END, updated_at = v.at \
             FROM v WHERE failover_jobs.job_id = v.id",
            placeholders(10, chunk.len())
        );
        let mut stmt = tx.prepare_cached(&sql)?;
        let mut b = Binder::new(&mut stmt);
        for p in chunk {
            b.bind(&p.id)?
                .bind(p.status)?
                .bind(p.snapshot)?
                .bind(p.vm)?
                .bind(p.error)?
                .bind(p.started)?
                .bind(p.completed)?
                .bind(&p.at)?
                .bind(p.release_lock)?
                .bind(p.networks)?;
        }
        stmt.raw_execute()?;
    }
    for chunk in chunked(&rows.tracking) {
        let sql = format!(
            "INSERT INTO job_tracking (id, parent_job_id, operation, status, metadata, error_message, created_at, \
             updated_at, correlation_id) \
             VALUES {} ON CONFLICT (parent_job_id, operation) DO UPDATE SET status = excluded.status, \
             metadata = excluded.metadata, error_message = excluded.error_message, updated_at = excluded.updated_at",
            placeholders(9, chunk.len())
        );
        let mut stmt = tx.prepare_cached(&sql)?;
        let mut b = Binder::new(&mut stmt);
        for t in chunk {
            b.bind(&t.id)?
                .bind(&t.parent)?
                .bind(t.operation)?
                .bind(t.status)?
                .bind(text(t.metadata)?)?
                .bind(t.error)?
                .bind(&t.at)?
                .bind(&t.at)?
                .bind(t.correlation)?;
        }
        stmt.raw_execute()?;
    }
    Ok(())
}

/// The compare-and-set of every checkpoint at once. Returns the outcome of each run it matched;
/// a run it did not match was fenced and nothing of it was written.
fn compare_and_set(tx: &Transaction, cps: &[&Checkpoint]) -> Result<HashMap<String, CheckpointOutcome>> {
    let mut matched = HashMap::with_capacity(cps.len());
    for chunk in chunked(cps) {
        let sql = format!(
            "WITH v(id, token, owner, seq, expect, state, status, display, step, context, n, wake, wake_on_signal, \
                    now, release, started, terminal, signals, cancel) AS (VALUES {}) \
             UPDATE runs SET state = v.state, status = v.status, display_status = v.display, current_step = v.step, \
                 context = COALESCE(v.context, runs.context), last_seq = runs.last_seq + v.n, \
                 wake_at = {wake}, \
                 lease_owner = CASE WHEN v.release THEN NULL ELSE runs.lease_owner END, \
                 lease_expires_at = CASE WHEN v.release THEN NULL ELSE runs.lease_expires_at END, \
                 signals_pending = runs.signals_pending - v.signals, \
                 cancel_pending = CASE WHEN v.cancel THEN 0 ELSE runs.cancel_pending END, \
                 updated_at = v.now, started_at = COALESCE(runs.started_at, CASE WHEN v.started THEN v.now END), \
                 completed_at = COALESCE(runs.completed_at, CASE WHEN v.terminal THEN v.now END) \
             FROM v WHERE runs.id = v.id AND runs.fencing_token = v.token AND runs.lease_owner = v.owner \
               AND runs.last_seq = v.seq AND runs.status = v.expect \
               AND (NOT v.terminal OR v.cancel OR NOT runs.cancel_pending) \
             RETURNING runs.id, runs.last_seq, runs.signals_pending, runs.cancel_pending",
            placeholders(19, chunk.len()),
            wake = cas_wake_at(),
        );
        let mut stmt = tx.prepare_cached(&sql)?;
        let mut b = Binder::new(&mut stmt);
        for cp in chunk {
            let r = CasRow::of(cp);
            b.bind(&r.id)?
                .bind(r.token)?
                .bind(r.owner)?
                .bind(r.seq)?
                .bind(r.expect)?
                .bind(text(r.state)?)?
                .bind(r.status)?
                .bind(r.display)?
                .bind(r.step)?
                .bind(r.context.map(text).transpose()?)?
                .bind(r.n)?
                .bind(r.wake)?
                .bind(r.wake_on_signal)?
                .bind(r.now)?
                .bind(r.release)?
                .bind(r.started)?
                .bind(r.terminal)?
                .bind(r.signals)?
                .bind(r.cancel)?;
        }
        let mut rows = stmt.raw_query();
        while let Some(row) = rows.next()? {
            matched.insert(
                row.get::<_, String>(0)?,
                CheckpointOutcome {
                    last_seq: row.get(1)?,
                    signals_pending: row.get(2)?,
                    cancel_pending: row.get::<_, i64>(3)? != 0,
                },
            );
        }
    }
    Ok(matched)
}

fn commit_batch(conn: &mut Connection, batch: &[&WriteJob], known: &mut HashSet<String>) -> Result<Vec<Outcome>> {
    let mut tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut out: Vec<Option<Outcome>> = batch.iter().map(|_| None).collect();
    let mut rows = BatchRows::default();
    let mut new_defs: Vec<&str> = Vec::new();

    // Checkpoints: one compare-and-set for all; the journal rows of those it matched.
    let cps: Vec<(usize, &Checkpoint)> = batch
        .iter()
        .enumerate()
        .filter_map(|(i, j)| match j {
            WriteJob::Checkpoint(cp, _) => Some((i, &**cp)),
            _ => None,
        })
        .collect();
    if !cps.is_empty() {
        let all: Vec<&Checkpoint> = cps.iter().map(|(_, cp)| *cp).collect();
        let matched = compare_and_set(&tx, &all)?;
        for (i, cp) in cps {
            out[i] = Some(Outcome::Checkpoint(match matched.get(&cp.run_id.to_string()) {
                Some(o) => {
                    rows.add(cp.run_id, cp.expected_seq + 1, &cp.records, &cp.projection, cp.now);
                    for id in &cp.consumed_signals {
                        tx.prepare_cached("UPDATE signals SET consumed_at = ?1 WHERE id = ?2 AND consumed_at IS NULL")?
                            .execute((cp.now.0, id))?;
                    }
                    Ok(*o)
                }
                None => Err(StoreError::Fenced { run: cp.run_id }),
            }));
        }
    }

    // Submits, one by one (a locked one under a savepoint, so its failure is its own).
    for (i, job) in batch.iter().enumerate() {
        let WriteJob::Submit(run, _) = job else { continue };
        if !known.contains(&run.definition_hash) && !new_defs.contains(&run.definition_hash.as_str()) {
            tx.prepare_cached(
                "INSERT INTO definitions (hash, name, source, created_at) VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (hash) DO NOTHING",
            )?
            .execute((&run.definition_hash, &run.definition, &run.definition_source, run.now.0))?;
            new_defs.push(&run.definition_hash);
        }
        let r = if run.lock_key.is_some() {
            // Dropping the savepoint unreleased rolls it back: a refused submit leaves nothing.
            let sp = tx.savepoint()?;
            let r = insert_run(&sp, run);
            if r.is_ok() {
                sp.commit()?;
            }
            r
        } else {
            insert_run(&tx, run)
        };
        if let Ok(Submitted { created: true, .. }) = &r {
            rows.add(run.id, 1, std::slice::from_ref(&run.record), &run.projection, run.now);
            if let Some(start) = &run.start {
                rows.add_journal(run.id, 2, &start.records, run.now);
            }
        }
        out[i] = Some(Outcome::Submit(Box::new(r)));
    }

    write_rows(&tx, &rows)?;

    // Leases: claims after the submits, so a run submitted in this batch can be claimed in it.
    for (i, job) in batch.iter().enumerate() {
        let o = match job {
            WriteJob::Claim(c, _) => Outcome::Claim(claim(&tx, c)),
            WriteJob::Heartbeat(h, _) => Outcome::Lease(
                match tx
                    .prepare_cached(
                        "UPDATE runs SET lease_expires_at = ?1 WHERE id = ?2 AND lease_owner = ?3 AND fencing_token = ?4",
                    )?
                    .execute((h.expires_at.0, h.run.to_string(), &h.lease.owner, h.lease.token))?
                {
                    0 => Err(StoreError::Fenced { run: h.run }),
                    _ => Ok(()),
                },
            ),
            WriteJob::Release(r, _) => {
                tx.prepare_cached(
                    "UPDATE runs SET lease_owner = NULL, lease_expires_at = NULL \
                     WHERE id = ?1 AND lease_owner = ?2 AND fencing_token = ?3",
                )?
                .execute((r.run.to_string(), &r.lease.owner, r.lease.token))?;
                Outcome::Lease(Ok(()))
            }
            WriteJob::Checkpoint(..) | WriteJob::Submit(..) => continue,
        };
        out[i] = Some(o);
    }

    tx.commit()?;
    known.extend(new_defs.into_iter().map(str::to_string));
    out.into_iter()
        .zip(batch)
        .map(|(o, job)| Ok(o.unwrap_or_else(|| job.failed(StoreError::Corrupt("job left unanswered".into())))))
        .collect()
}

fn claim(tx: &Transaction, c: &ClaimJob) -> Result<Vec<(RunRow, Lease)>> {
    let mut stmt = tx.prepare_cached(&format!(
        "UPDATE runs SET lease_owner = ?1, lease_expires_at = ?2, fencing_token = fencing_token + 1 \
         WHERE id IN (SELECT id FROM runs WHERE wake_at IS NOT NULL AND wake_at <= ?3 \
                      AND (lease_expires_at IS NULL OR lease_expires_at < ?3) ORDER BY wake_at LIMIT ?4) \
         RETURNING {RUN_COLUMNS}"
    ))?;
    let mut rows = stmt.query((&c.owner, c.now.plus(c.lease_ttl).0, c.now.0, c.limit as i64))?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        let run = run_from_row(row)?;
        let lease = Lease {
            owner: c.owner.clone(),
            token: run.fencing_token,
        };
        out.push((run, lease));
    }
    Ok(out)
}

/// Creates the run row and its failover_jobs row (idempotent by request id). Its journal rows and
/// projection are written with the batch's.
fn insert_run(tx: &Connection, run: &NewRun) -> Result<Submitted> {
    if let Some(req) = &run.request_id {
        let mut stmt = tx.prepare_cached(&format!("SELECT {RUN_COLUMNS} FROM runs WHERE request_id = ?1"))?;
        let mut rows = stmt.query([req])?;
        if let Some(row) = rows.next()? {
            return Ok(Submitted {
                run: run_from_row(row)?,
                created: false,
                journal: Vec::new(),
            });
        }
    }
    let pending = RunState::Pending;
    let (state, current_step, last_seq) = match &run.start {
        Some(s) => (&s.state, s.current_step.as_deref(), 1 + s.records.len() as i64),
        None => (&pending, None, 1),
    };
    let lease = run.start.as_ref().map(|s| (&s.lease, s.lease_expires_at));
    let mut stmt = tx.prepare_cached(&format!(
        "INSERT INTO runs (id, definition, definition_hash, request_id, correlation_id, status, display_status, \
         current_step, state, input, context, last_seq, wake_at, fencing_token, lease_owner, lease_expires_at, \
         created_at, updated_at, started_at, trace_parent) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, '{{}}', ?11, ?12, ?13, ?14, ?15, ?12, ?12, ?16, ?17) \
         RETURNING {RUN_COLUMNS}"
    ))?;
    let mut b = Binder::new(&mut stmt);
    b.bind(run.id.to_string())?
        .bind(&run.definition)?
        .bind(&run.definition_hash)?
        .bind(&run.request_id)?
        .bind(&run.correlation_id)?
        .bind(state.status().as_str())?
        .bind(&run.display_status)?
        .bind(current_step)?
        .bind(text(state)?)?
        .bind(text(&run.input)?)?
        .bind(last_seq)?
        .bind(run.now.0)?
        .bind(lease.map_or(0, |(l, _)| l.token))?
        .bind(lease.map(|(l, _)| l.owner.as_str()))?
        .bind(lease.map(|(_, at)| at.0))?
        .bind(run.start.as_ref().map(|_| run.now.0))?
        .bind(&run.trace_parent)?;
    let created = {
        let mut rows = stmt.raw_query();
        let row = rows
            .next()?
            .ok_or_else(|| StoreError::Corrupt("INSERT ... RETURNING gave no row".into()))?;
        run_from_row(row)?
    };
    tx.prepare_cached(
        "INSERT INTO failover_jobs (job_id, vm_id, vm_name, job_type, status, source_vm_spec, network_mappings, \
         correlation_id, created_at, updated_at, lock_key) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?9, ?10)",
    )?
    .execute((
        run.id.to_string(),
        &run.subject.vm_id,
        run.subject.vm_name.as_deref(),
        &run.job_type,
        &run.display_status,
        run.subject.source_vm_spec.as_deref(),
        run.projection.network_mappings.as_deref(),
        &run.correlation_id,
        run.now.to_rfc3339(),
        &run.lock_key,
    ))
    .map_err(|e| lock_conflict(e, &run.lock_key))?;
    Ok(Submitted {
        run: created,
        created: true,
        journal: run.journal(),
    })
}

/// A unique violation of the insert that carries `lock_key` is the lock being held.
fn lock_conflict(e: rusqlite::Error, key: &Option<String>) -> StoreError {
    match (&e, key) {
        (rusqlite::Error::SqliteFailure(f, _), Some(key))
            if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE =>
        {
            StoreError::Conflict { key: key.clone() }
        }
        _ => StoreError::Sqlite(e),
    }
}
