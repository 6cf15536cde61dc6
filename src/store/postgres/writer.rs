//! The PostgreSQL side of group commit (see [`crate::store::group`]): checkpoints and submits
//! of this process go through one writer, so one transaction (one WAL flush) carries the
//! checkpoints of many runs. Claims, heartbeats and releases stay on the pool: PostgreSQL has
//! row locks and `SKIP LOCKED`, so they never wait on the writer. Several processes each have
//! their own writer; the compare-and-set decides between them exactly as it does for one.
//!
//! A batch: one compare-and-set over all its checkpoints (`UPDATE ... FROM
//! jsonb_array_elements`), the submits one by one (a locked one under a savepoint, so VM_BUSY is
//! undone alone), then one insert of every journal row and one update of every projection.

use std::collections::{HashMap, HashSet};

use async_trait::async_trait;
use serde_json::Value;
use sqlx::types::Json;
use sqlx::{PgConnection, PgPool, Row};

use super::{lock_conflict, run_from_row, tsz, RUN_COLUMNS};
use crate::engine::machine::RunState;
use crate::store::group::{json, BatchRows, CasRow, Committer, Outcome, WriteJob};
use crate::store::{Checkpoint, CheckpointOutcome, NewRun, Result, StoreError, Submitted};

pub(super) struct PgCommitter {
    pub pool: PgPool,
    /// The NOTIFY channel that wakes the workers of every process.
    pub channel: String,
}

#[async_trait]
impl Committer for PgCommitter {
    async fn commit(&self, batch: &[&WriteJob], known: &mut HashSet<String>) -> Result<Vec<Outcome>> {
        let mut tx = self.pool.begin().await?;
        let mut out: Vec<Option<Outcome>> = batch.iter().map(|_| None).collect();
        let mut rows = BatchRows::default();
        let mut new_defs: Vec<&str> = Vec::new();

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
                        if !cp.consumed_signals.is_empty() {
                            sqlx::query(
                                "UPDATE signals SET consumed_at = $1 WHERE id = ANY($2) AND consumed_at IS NULL",
                            )
                            .bind(cp.now.0)
                            .bind(&cp.consumed_signals)
                            .execute(&mut *tx)
                            .await?;
                        }
                        Ok(*o)
                    }
                    None => Err(StoreError::Fenced { run: cp.run_id }),
                }));
            }
        }

        let mut created = false;
        for (i, job) in batch.iter().enumerate() {
            let o = match job {
                WriteJob::Submit(run, _) => {
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
                        match r {
                            Err(StoreError::Conflict { .. }) => {
                                sqlx::query("ROLLBACK TO SAVEPOINT submit").execute(&mut *tx).await?;
                            }
                            // Any other error aborted the transaction: the batch is retried job by job.
                            Err(e) => return Err(e),
                            Ok(_) => {}
                        }
                        sqlx::query("RELEASE SAVEPOINT submit").execute(&mut *tx).await?;
                        r
                    } else {
                        Ok(insert_run(&mut tx, run).await?)
                    };
                    if let Ok(Submitted { created: true, .. }) = &r {
                        created = true;
                        rows.add(run.id, 1, std::slice::from_ref(&run.record), &run.projection, run.now);
                        if let Some(start) = &run.start {
                            rows.add_journal(run.id, 2, &start.records, run.now);
                        }
                    }
                    Outcome::Submit(Box::new(r))
                }
                WriteJob::Checkpoint(..) => continue,
                other @ (WriteJob::Claim(..) | WriteJob::Heartbeat(..) | WriteJob::Release(..)) => other.failed(
                    StoreError::Config("leases are not written by the PostgreSQL writer".into()),
                ),
            };
            out[i] = Some(o);
        }

        write_rows(&mut tx, &rows).await?;
        if created {
            sqlx::query("SELECT pg_notify($1, '')")
                .bind(&self.channel)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        known.extend(new_defs.into_iter().map(str::to_string));
        Ok(out
            .into_iter()
            .zip(batch)
            .map(|(o, job)| o.unwrap_or_else(|| job.failed(StoreError::Corrupt("job left unanswered".into()))))
            .collect())
    }
}

async fn compare_and_set(tx: &mut PgConnection, cps: &[&Checkpoint]) -> Result<HashMap<String, CheckpointOutcome>> {
    let rows: Vec<CasRow> = cps.iter().map(|cp| CasRow::of(cp)).collect();
    let out = sqlx::query(
        "UPDATE runs SET state = v.state, status = v.status, display_status = v.display, current_step = v.step, \
             context = COALESCE(v.context, runs.context), last_seq = runs.last_seq + v.n, \
             wake_at = CASE WHEN (NOT v.terminal AND runs.cancel_pending AND NOT v.cancel) \
                              OR (v.wake_on_signal AND runs.signals_pending - v.signals > 0) THEN v.now \
                            ELSE v.wake END, \
             lease_owner = CASE WHEN v.release THEN NULL ELSE runs.lease_owner END, \
             lease_expires_at = CASE WHEN v.release THEN NULL ELSE runs.lease_expires_at END, \
             signals_pending = runs.signals_pending - v.signals, \
             cancel_pending = CASE WHEN v.cancel THEN FALSE ELSE runs.cancel_pending END, \
             updated_at = v.now, started_at = COALESCE(runs.started_at, CASE WHEN v.started THEN v.now END), \
             completed_at = CASE WHEN v.terminal THEN v.now ELSE runs.completed_at END \
         FROM (SELECT (e->>'id')::uuid AS id, (e->>'token')::bigint AS token, e->>'owner' AS owner, \
                      (e->>'seq')::bigint AS seq, e->>'expect' AS expect, e->'state' AS state, e->>'status' AS status, \
                      e->>'display' AS display, e->>'step' AS step, NULLIF(e->'context', 'null'::jsonb) AS context, \
                      (e->>'n')::bigint AS n, (e->>'wake')::bigint AS wake, \
                      (e->>'wake_on_signal')::boolean AS wake_on_signal, (e->>'now')::bigint AS now, \
                      (e->>'release')::boolean AS release, (e->>'started')::boolean AS started, \
                      (e->>'terminal')::boolean AS terminal, (e->>'signals')::bigint AS signals, \
                      (e->>'cancel')::boolean AS cancel \
               FROM jsonb_array_elements($1::jsonb) AS e) AS v \
         WHERE runs.id = v.id AND runs.fencing_token = v.token AND runs.lease_owner = v.owner \
           AND runs.last_seq = v.seq AND runs.status = v.expect \
         RETURNING runs.id::text AS id, runs.last_seq, runs.signals_pending, runs.cancel_pending",
    )
    .bind(json(&rows)?)
    .fetch_all(&mut *tx)
    .await?;
    out.iter()
        .map(|r| {
            Ok((
                r.try_get::<String, _>("id")?,
                CheckpointOutcome {
                    last_seq: r.try_get("last_seq")?,
                    signals_pending: r.try_get("signals_pending")?,
                    cancel_pending: r.try_get("cancel_pending")?,
                },
            ))
        })
        .collect()
}

/// The batch's journal rows, projections and tracking rows: one statement each.
async fn write_rows(tx: &mut PgConnection, rows: &BatchRows<'_>) -> Result<()> {
    if !rows.journal.is_empty() {
        sqlx::query(
            "INSERT INTO journal (run_id, seq, kind, record, at) \
             SELECT (e->>'run')::uuid, (e->>'seq')::bigint, e->>'kind', e->'record', (e->>'at')::bigint \
             FROM jsonb_array_elements($1::jsonb) AS e",
        )
        .bind(json(&rows.journal)?)
        .execute(&mut *tx)
        .await?;
    }
    if !rows.projections.is_empty() {
        sqlx::query(
            "UPDATE failover_jobs SET status = COALESCE(v.status, failover_jobs.status), \
             linstor_snapshot_name = COALESCE(v.snapshot, failover_jobs.linstor_snapshot_name), \
             destination_vm_id = COALESCE(v.vm, failover_jobs.destination_vm_id), \
             error_message = COALESCE(v.error, failover_jobs.error_message), \
             started_at = CASE WHEN v.started AND failover_jobs.started_at IS NULL THEN v.at ELSE failover_jobs.started_at END, \
             completed_at = CASE WHEN v.completed THEN v.at ELSE failover_jobs.completed_at END, updated_at = v.at \
             FROM (SELECT e->>'id' AS id, e->>'status' AS status, e->>'snapshot' AS snapshot, e->>'vm' AS vm, \
                          e->>'error' AS error, (e->>'started')::boolean AS started, \
                          (e->>'completed')::boolean AS completed, (e->>'at')::timestamptz AS at \
                   FROM jsonb_array_elements($1::jsonb) AS e) AS v \
             WHERE failover_jobs.job_id = v.id",
        )
        .bind(json(&rows.projections)?)
        .execute(&mut *tx)
        .await?;
    }
    if !rows.tracking.is_empty() {
        sqlx::query(
            "INSERT INTO job_tracking (id, parent_job_id, operation, status, metadata, error_message, created_at, updated_at) \
             SELECT e->>'id', e->>'parent', e->>'operation', e->>'status', e->'metadata', e->>'error', \
                    (e->>'at')::timestamptz, (e->>'at')::timestamptz FROM jsonb_array_elements($1::jsonb) AS e \
             ON CONFLICT (parent_job_id, operation) DO UPDATE SET status = excluded.status, metadata = excluded.metadata, \
             error_message = excluded.error_message, updated_at = excluded.updated_at",
        )
        .bind(json(&rows.tracking)?)
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

/// Creates the run row and its failover_jobs row (idempotent by request id: two concurrent
/// submits with one request id make one run). Its journal rows and projection go with the batch.
async fn insert_run(tx: &mut PgConnection, run: &NewRun) -> Result<Submitted> {
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
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, '{{}}'::jsonb, $11, $12, $13, $14, $15, $12, $12, $16) \
         ON CONFLICT (request_id) DO NOTHING RETURNING {RUN_COLUMNS}"
    ))
    .bind(run.id.0)
    .bind(&run.definition)
    .bind(&run.definition_hash)
    .bind(&run.request_id)
    .bind(&run.correlation_id)
    .bind(state.status().as_str())
    .bind(&run.display_status)
    .bind(current_step)
    .bind(Json(state))
    .bind(Json(&run.input))
    .bind(last_seq)
    .bind(run.now.0)
    .bind(lease.map_or(0, |(l, _)| l.token))
    .bind(lease.map(|(l, _)| l.owner.as_str()))
    .bind(lease.map(|(_, at)| at.0))
    .bind(run.start.as_ref().map(|_| run.now.0))
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = row else {
        let req = run.request_id.as_deref().unwrap_or_default();
        let existing = sqlx::query(&format!("SELECT {RUN_COLUMNS} FROM runs WHERE request_id = $1"))
            .bind(req)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| StoreError::Corrupt(format!("request id {req:?} conflicted but no run has it")))?;
        return Ok(Submitted {
            run: run_from_row(&existing)?,
            created: false,
        });
    };
    let at = tsz(9);
    sqlx::query(&format!(
        "INSERT INTO failover_jobs (job_id, vm_id, vm_name, job_type, status, source_vm_spec, network_mappings, \
         correlation_id, created_at, updated_at, lock_key) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, {at}, {at}, $10)"
    ))
    .bind(run.id.to_string())
    .bind(run.input.get("vm_id").and_then(Value::as_str).unwrap_or(""))
    .bind(run.input.get("vm_name").and_then(Value::as_str))
    .bind(&run.job_type)
    .bind(&run.display_status)
    .bind(run.input.get("source_vm_spec").map(|v| v.to_string()))
    .bind(run.input.get("network_mappings").map(|v| v.to_string()))
    .bind(&run.correlation_id)
    .bind(run.now.0)
    .bind(&run.lock_key)
    .execute(&mut *tx)
    .await
    .map_err(|e| lock_conflict(e, &run.lock_key))?;
    Ok(Submitted {
        run: run_from_row(&row)?,
        created: true,
    })
}
