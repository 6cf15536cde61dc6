//! The SQLite side of group commit (see [`crate::store::group`]). Because SQLite has one
//! writer at a time, every write of the hot path goes through the one writer: checkpoints,
//! submits, claims, heartbeats and releases, so no write ever waits on the busy timeout.
//!
//! A batch: one compare-and-set over all its checkpoints (`WITH v AS (VALUES ...) UPDATE runs
//! ... FROM v`; a checkpoint it did not match was fenced and writes nothing), the submits one by
//! one (a locked one under a savepoint, so a VM_BUSY failure is undone alone), then one insert
//! of every journal row, one update of every projection, and the claims last, so a run
//! submitted in the batch can be claimed in it. Multi-row statements come in a few fixed row
//! counts ([`CHUNKS`]).

use std::collections::{HashMap, HashSet};

use async_trait::async_trait;
use serde_json::Value;
use sqlx::{Row, SqliteConnection, SqlitePool};

use super::{lock_conflict, run_from_row, RUN_COLUMNS};
use crate::engine::machine::RunState;
use crate::store::group::{BatchRows, CasRow, ClaimJob, Committer, Outcome, WriteJob};
use crate::store::{Checkpoint, CheckpointOutcome, Lease, NewRun, Result, RunRow, StoreError, Submitted};

/// Row counts a multi-row statement is prepared for: a batch is cut into chunks of these sizes,
/// so only a handful of distinct statements are ever prepared (and cached by sqlx). Values are
/// bound as parameters: parsing a JSON document per row cost more than the statements.
const CHUNKS: [usize; 4] = [64, 16, 4, 1];

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

/// The batch's journal rows, projections and tracking rows: one statement per chunk.
async fn write_rows(tx: &mut SqliteConnection, rows: &BatchRows<'_>) -> Result<()> {
    for chunk in chunked(&rows.journal) {
        let sql = format!(
            "INSERT INTO journal (run_id, seq, kind, record, at) VALUES {}",
            placeholders(5, chunk.len())
        );
        let mut q = sqlx::query(&sql);
        for r in chunk {
            q = q.bind(&r.run).bind(r.seq).bind(r.kind).bind(text(r.record)?).bind(r.at);
        }
        q.execute(&mut *tx).await?;
    }
    for chunk in chunked(&rows.projections) {
        let sql = format!(
            "WITH v(id, status, snapshot, vm, error, started, completed, at) AS (VALUES {}) \
             UPDATE failover_jobs SET status = COALESCE(v.status, failover_jobs.status), \
             linstor_snapshot_name = COALESCE(v.snapshot, failover_jobs.linstor_snapshot_name), \
             destination_vm_id = COALESCE(v.vm, failover_jobs.destination_vm_id), \
             error_message = COALESCE(v.error, failover_jobs.error_message), \
             started_at = CASE WHEN v.started AND failover_jobs.started_at IS NULL THEN v.at ELSE failover_jobs.started_at END, \
             completed_at = CASE WHEN v.completed THEN v.at ELSE failover_jobs.completed_at END, updated_at = v.at \
             FROM v WHERE failover_jobs.job_id = v.id",
            placeholders(8, chunk.len())
        );
        let mut q = sqlx::query(&sql);
        for p in chunk {
            q = q
                .bind(&p.id)
                .bind(p.status)
                .bind(p.snapshot)
                .bind(p.vm)
                .bind(p.error)
                .bind(p.started)
                .bind(p.completed)
                .bind(&p.at);
        }
        q.execute(&mut *tx).await?;
    }
    for chunk in chunked(&rows.tracking) {
        let sql = format!(
            "INSERT INTO job_tracking (id, parent_job_id, operation, status, metadata, error_message, created_at, updated_at) \
             VALUES {} ON CONFLICT (parent_job_id, operation) DO UPDATE SET status = excluded.status, \
             metadata = excluded.metadata, error_message = excluded.error_message, updated_at = excluded.updated_at",
            placeholders(8, chunk.len())
        );
        let mut q = sqlx::query(&sql);
        for t in chunk {
            q = q
                .bind(&t.id)
                .bind(&t.parent)
                .bind(t.operation)
                .bind(t.status)
                .bind(text(t.metadata)?)
                .bind(t.error)
                .bind(&t.at)
                .bind(&t.at);
        }
        q.execute(&mut *tx).await?;
    }
    Ok(())
}

/// The compare-and-set of every checkpoint at once. Returns the outcome of each run it matched;
/// a run it did not match was fenced and nothing of it was written.
async fn compare_and_set(tx: &mut SqliteConnection, cps: &[&Checkpoint]) -> Result<HashMap<String, CheckpointOutcome>> {
    let mut matched = HashMap::with_capacity(cps.len());
    for chunk in chunked(cps) {
        let sql = format!(
            "WITH v(id, token, owner, seq, expect, state, status, display, step, context, n, wake, wake_on_signal, \
                    now, release, started, terminal, signals, cancel) AS (VALUES {}) \
             UPDATE runs SET state = v.state, status = v.status, display_status = v.display, current_step = v.step, \
                 context = COALESCE(v.context, runs.context), last_seq = runs.last_seq + v.n, \
                 wake_at = CASE WHEN (NOT v.terminal AND runs.cancel_pending AND NOT v.cancel) \
                                  OR (v.wake_on_signal AND runs.signals_pending - v.signals > 0) THEN v.now \
                                ELSE v.wake END, \
                 lease_owner = CASE WHEN v.release THEN NULL ELSE runs.lease_owner END, \
                 lease_expires_at = CASE WHEN v.release THEN NULL ELSE runs.lease_expires_at END, \
                 signals_pending = runs.signals_pending - v.signals, \
                 cancel_pending = CASE WHEN v.cancel THEN 0 ELSE runs.cancel_pending END, \
                 updated_at = v.now, started_at = COALESCE(runs.started_at, CASE WHEN v.started THEN v.now END), \
                 completed_at = CASE WHEN v.terminal THEN v.now ELSE runs.completed_at END \
             FROM v WHERE runs.id = v.id AND runs.fencing_token = v.token AND runs.lease_owner = v.owner \
               AND runs.last_seq = v.seq AND runs.status = v.expect \
             RETURNING runs.id, runs.last_seq, runs.signals_pending, runs.cancel_pending",
            placeholders(19, chunk.len())
        );
        let mut q = sqlx::query(&sql);
        for cp in chunk {
            let r = CasRow::of(cp);
            q = q
                .bind(r.id)
                .bind(r.token)
                .bind(r.owner)
                .bind(r.seq)
                .bind(r.expect)
                .bind(text(r.state)?)
                .bind(r.status)
                .bind(r.display)
                .bind(r.step)
                .bind(r.context.map(text).transpose()?)
                .bind(r.n)
                .bind(r.wake)
                .bind(r.wake_on_signal)
                .bind(r.now)
                .bind(r.release)
                .bind(r.started)
                .bind(r.terminal)
                .bind(r.signals)
                .bind(r.cancel);
        }
        for row in q.fetch_all(&mut *tx).await? {
            matched.insert(
                row.try_get::<String, _>("id")?,
                CheckpointOutcome {
                    last_seq: row.try_get("last_seq")?,
                    signals_pending: row.try_get("signals_pending")?,
                    cancel_pending: row.try_get::<i64, _>("cancel_pending")? != 0,
                },
            );
        }
    }
    Ok(matched)
}

/// The SQLite side of group commit: everything, claims and leases included, goes through it.
pub(super) struct SqliteCommitter(pub SqlitePool);

#[async_trait]
impl Committer for SqliteCommitter {
    async fn commit(&self, batch: &[&WriteJob], known: &mut HashSet<String>) -> Result<Vec<Outcome>> {
        commit_batch(&self.0, batch, known).await
    }
}

async fn commit_batch(pool: &SqlitePool, batch: &[&WriteJob], known: &mut HashSet<String>) -> Result<Vec<Outcome>> {
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
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
        let matched = compare_and_set(&mut tx, &all).await?;
        for (i, cp) in cps {
            out[i] = Some(Outcome::Checkpoint(match matched.get(&cp.run_id.to_string()) {
                Some(o) => {
                    rows.add(cp.run_id, cp.expected_seq + 1, &cp.records, &cp.projection, cp.now);
                    for id in &cp.consumed_signals {
                        sqlx::query("UPDATE signals SET consumed_at = $1 WHERE id = $2 AND consumed_at IS NULL")
                            .bind(cp.now.0)
                            .bind(id)
                            .execute(&mut *tx)
                            .await?;
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
            sqlx::query(
                "INSERT INTO definitions (hash, name, source, created_at) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (hash) DO NOTHING",
            )
            .bind(&run.definition_hash)
            .bind(&run.definition)
            .bind(&run.definition_source)
            .bind(run.now.0)
            .execute(&mut *tx)
            .await?;
            new_defs.push(&run.definition_hash);
        }
        let r = if run.lock_key.is_some() {
            sqlx::query("SAVEPOINT submit").execute(&mut *tx).await?;
            let r = insert_run(&mut tx, run).await;
            if r.is_err() {
                sqlx::query("ROLLBACK TO SAVEPOINT submit").execute(&mut *tx).await?;
            }
            sqlx::query("RELEASE SAVEPOINT submit").execute(&mut *tx).await?;
            r
        } else {
            insert_run(&mut tx, run).await
        };
        if let Ok(Submitted { created: true, .. }) = &r {
            rows.add(run.id, 1, std::slice::from_ref(&run.record), &run.projection, run.now);
            if let Some(start) = &run.start {
                rows.add_journal(run.id, 2, &start.records, run.now);
            }
        }
        out[i] = Some(Outcome::Submit(Box::new(r)));
    }

    write_rows(&mut tx, &rows).await?;

    // Leases: claims after the submits, so a run submitted in this batch can be claimed in it.
    for (i, job) in batch.iter().enumerate() {
        let o = match job {
            WriteJob::Claim(c, _) => Outcome::Claim(claim(&mut tx, c).await),
            WriteJob::Heartbeat(h, _) => Outcome::Lease(
                match sqlx::query(
                    "UPDATE runs SET lease_expires_at = $1 WHERE id = $2 AND lease_owner = $3 AND fencing_token = $4",
                )
                .bind(h.expires_at.0)
                .bind(h.run.to_string())
                .bind(&h.lease.owner)
                .bind(h.lease.token)
                .execute(&mut *tx)
                .await?
                .rows_affected()
                {
                    0 => Err(StoreError::Fenced { run: h.run }),
                    _ => Ok(()),
                },
            ),
            WriteJob::Release(r, _) => {
                sqlx::query(
                    "UPDATE runs SET lease_owner = NULL, lease_expires_at = NULL \
                     WHERE id = $1 AND lease_owner = $2 AND fencing_token = $3",
                )
                .bind(r.run.to_string())
                .bind(&r.lease.owner)
                .bind(r.lease.token)
                .execute(&mut *tx)
                .await?;
                Outcome::Lease(Ok(()))
            }
            WriteJob::Checkpoint(..) | WriteJob::Submit(..) => continue,
        };
        out[i] = Some(o);
    }

    tx.commit().await?;
    known.extend(new_defs.into_iter().map(str::to_string));
    out.into_iter()
        .zip(batch)
        .map(|(o, job)| Ok(o.unwrap_or_else(|| job.failed(StoreError::Corrupt("job left unanswered".into())))))
        .collect()
}

async fn claim(tx: &mut SqliteConnection, c: &ClaimJob) -> Result<Vec<(RunRow, Lease)>> {
    let rows = sqlx::query(&format!(
        "UPDATE runs SET lease_owner = $1, lease_expires_at = $2, fencing_token = fencing_token + 1 \
         WHERE id IN (SELECT id FROM runs WHERE wake_at IS NOT NULL AND wake_at <= $3 \
                      AND (lease_expires_at IS NULL OR lease_expires_at < $3) ORDER BY wake_at LIMIT $4) \
         RETURNING {RUN_COLUMNS}"
    ))
    .bind(&c.owner)
    .bind(c.now.plus(c.lease_ttl).0)
    .bind(c.now.0)
    .bind(c.limit as i64)
    .fetch_all(&mut *tx)
    .await?;
    rows.iter()
        .map(|r| {
            let run = run_from_row(r)?;
            let lease = Lease {
                owner: c.owner.clone(),
                token: run.fencing_token,
            };
            Ok((run, lease))
        })
        .collect()
}

/// Creates the run row and its failover_jobs row (idempotent by request id). Its journal rows and
/// projection are written with the batch's.
async fn insert_run(tx: &mut SqliteConnection, run: &NewRun) -> Result<Submitted> {
    if let Some(req) = &run.request_id {
        let existing = sqlx::query(&format!("SELECT {RUN_COLUMNS} FROM runs WHERE request_id = $1"))
            .bind(req)
            .fetch_optional(&mut *tx)
            .await?;
        if let Some(row) = existing {
            return Ok(Submitted {
                run: run_from_row(&row)?,
                created: false,
            });
        }
    }
    let pending = RunState::Pending;
    let (state, current_step, last_seq) = match &run.start {
        Some(s) => (&s.state, s.current_step.as_deref(), 1 + s.records.len() as i64),
        None => (&pending, None, 1),
    };
    let lease = run.start.as_ref().map(|s| (&s.lease, s.lease_expires_at));
    let row = sqlx::query(&format!(
        "INSERT INTO runs (id, definition, definition_hash, request_id, correlation_id, status, display_status, \
         current_step, state, input, context, last_seq, wake_at, fencing_token, lease_owner, lease_expires_at, \
         created_at, updated_at, started_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, '{{}}', $11, $12, $13, $14, $15, $12, $12, $16) \
         RETURNING {RUN_COLUMNS}"
    ))
    .bind(run.id.to_string())
    .bind(&run.definition)
    .bind(&run.definition_hash)
    .bind(&run.request_id)
    .bind(&run.correlation_id)
    .bind(state.status().as_str())
    .bind(&run.display_status)
    .bind(current_step)
    .bind(sqlx::types::Json(state))
    .bind(sqlx::types::Json(&run.input))
    .bind(last_seq)
    .bind(run.now.0)
    .bind(lease.map_or(0, |(l, _)| l.token))
    .bind(lease.map(|(l, _)| l.owner.as_str()))
    .bind(lease.map(|(_, at)| at.0))
    .bind(run.start.as_ref().map(|_| run.now.0))
    .fetch_one(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO failover_jobs (job_id, vm_id, vm_name, job_type, status, source_vm_spec, network_mappings, \
         correlation_id, created_at, updated_at, lock_key) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9, $10)",
    )
    .bind(run.id.to_string())
    .bind(run.input.get("vm_id").and_then(Value::as_str).unwrap_or(""))
    .bind(run.input.get("vm_name").and_then(Value::as_str))
    .bind(&run.job_type)
    .bind(&run.display_status)
    .bind(run.input.get("source_vm_spec").map(|v| v.to_string()))
    .bind(run.input.get("network_mappings").map(|v| v.to_string()))
    .bind(&run.correlation_id)
    .bind(run.now.to_rfc3339())
    .bind(&run.lock_key)
    .execute(&mut *tx)
    .await
    .map_err(|e| lock_conflict(e, &run.lock_key))?;
    Ok(Submitted {
        run: run_from_row(&row)?,
        created: true,
    })
}
