//! What both backends say in the same SQL, written once: the inventory and the job read model
//! (both speak `$n` parameters and `ON CONFLICT`, and store those tables' ids as text), the
//! run reads, signals, cancels and the ledger (a run id bound as each backend stores it), and
//! the decoding of a run row.

use serde_json::Value;

use super::{parse_json, Result, RunRow, StoreError};
use crate::domain::run::{RunContext, RunStatus};
use crate::domain::{RunId, Timestamp};

/// The columns of a run row, as each backend stores them. PostgreSQL has uuid, jsonb and
/// boolean columns; SQLite stores the same values as text and integers. Implemented for every
/// row type a run is read from (sqlx's rows, and rusqlite's in SQLite's writer thread), so a
/// run row is decoded in one place.
pub(crate) trait Cols {
    fn text(&self, col: &str) -> Result<Option<String>>;
    fn int(&self, col: &str) -> Result<Option<i64>>;
    fn flag(&self, col: &str) -> Result<bool>;
    fn doc(&self, col: &str) -> Result<Value>;
    fn run_id(&self, col: &str) -> Result<RunId>;
}

pub(crate) const RUN_COLUMNS: &str =
    "id, definition, definition_hash, request_id, correlation_id, state, status, display_status, \
    current_step, input, context, last_seq, fencing_token, lease_owner, lease_expires_at, wake_at, signals_pending, \
    cancel_reason, cancel_principal, cancel_pending, created_at, updated_at, started_at, completed_at, trace_parent";

pub(crate) fn run_from_row(row: &impl Cols) -> Result<RunRow> {
    let text = |c: &str| {
        row.text(c)?
            .ok_or_else(|| StoreError::Corrupt(format!("runs.{c} is NULL")))
    };
    let int = |c: &str| {
        row.int(c)?
            .ok_or_else(|| StoreError::Corrupt(format!("runs.{c} is NULL")))
    };
    let ts = |c: &str| Ok::<_, StoreError>(row.int(c)?.map(Timestamp));
    let status = text("status")?;
    Ok(RunRow {
        id: row.run_id("id")?,
        definition: text("definition")?,
        definition_hash: text("definition_hash")?,
        request_id: row.text("request_id")?,
        correlation_id: text("correlation_id")?,
        state: parse_json("run state", row.doc("state")?)?,
        status: RunStatus::parse(&status).ok_or_else(|| StoreError::Corrupt(format!("status {status:?}")))?,
        display_status: text("display_status")?,
        current_step: row.text("current_step")?,
        input: row.doc("input")?,
        context: RunContext::from_value(row.doc("context")?)
            .map_err(|e| StoreError::Corrupt(format!("run context: {e}")))?,
        last_seq: int("last_seq")?,
        fencing_token: int("fencing_token")?,
        lease_owner: row.text("lease_owner")?,
        lease_expires_at: ts("lease_expires_at")?,
        wake_at: ts("wake_at")?,
        signals_pending: int("signals_pending")?,
        cancel_reason: row.text("cancel_reason")?,
        cancel_by: row.text("cancel_principal")?,
        cancel_pending: row.flag("cancel_pending")?,
        created_at: Timestamp(int("created_at")?),
        updated_at: Timestamp(int("updated_at")?),
        started_at: ts("started_at")?,
        completed_at: ts("completed_at")?,
        trace_parent: row.text("trace_parent")?,
    })
}

/// Decodes a JSON column stored as text (SQLite).
pub(crate) fn doc_of_text(col: &str, text: Option<String>) -> Result<Value> {
    let text = text.ok_or_else(|| StoreError::Corrupt(format!("runs.{col} is NULL")))?;
    serde_json::from_str(&text).map_err(|e| StoreError::Corrupt(format!("runs.{col}: {e}")))
}

/// Decodes a run id stored as text (SQLite).
pub(crate) fn run_id_of_text(col: &str, text: Option<String>) -> Result<RunId> {
    let text = text.ok_or_else(|| StoreError::Corrupt(format!("{col} is NULL")))?;
    text.parse()
        .map_err(|e| StoreError::Corrupt(format!("{col} {text:?}: {e}")))
}

/// Implements [`super::JobStore`] and [`super::InventoryStore`] for a backend. The backend
/// module provides `self.pool`, `self.begin_write()`, `self.list_jobs(filter)` (paging is
/// dialect-specific) and `JOB_COLUMNS` (PostgreSQL reads its timestamps as text).
macro_rules! inventory_and_jobs {
    ($store:ty, $row:ty) => {
        fn job_from_row(r: &$row) -> Result<FailoverJobRow> {
            Ok(FailoverJobRow {
                job_id: r.try_get("job_id")?,
                vm_id: r.try_get("vm_id")?,
                vm_name: r.try_get("vm_name")?,
                job_type: r.try_get("job_type")?,
                status: r.try_get("status")?,
                linstor_snapshot_name: r.try_get("linstor_snapshot_name")?,
                destination_vm_id: r.try_get("destination_vm_id")?,
                network_mappings: match r.try_get::<Option<String>, _>("network_mappings")? {
                    Some(text) => Some(serde_json::from_str(&text).map_err(|e| {
                        StoreError::Corrupt(format!("failover_jobs.network_mappings: {e}"))
                    })?),
                    None => None,
                },
                error_message: r.try_get("error_message")?,
                correlation_id: r.try_get("correlation_id")?,
                created_at: r.try_get("created_at")?,
                started_at: r.try_get("started_at")?,
                completed_at: r.try_get("completed_at")?,
            })
        }

        #[async_trait]
        impl JobStore for $store {
            async fn list_failover_jobs(&self, f: &JobFilter) -> Result<Vec<FailoverJobRow>> {
                self.list_jobs(f).await
            }

            async fn failover_job(&self, run: RunId) -> Result<Option<FailoverJobRow>> {
                let row = sqlx::query(&format!("SELECT {JOB_COLUMNS} FROM failover_jobs f WHERE job_id = $1"))
                    .bind(run.to_string())
                    .fetch_optional(&self.pool)
                    .await?;
                row.as_ref().map(job_from_row).transpose()
            }

            async fn job_tracking(&self, run: RunId) -> Result<Vec<JobTrackingRow>> {
                let rows = sqlx::query(
                    "SELECT id, parent_job_id, operation, status, metadata, error_message, correlation_id FROM job_tracking \
                     WHERE parent_job_id = $1 ORDER BY created_at, id",
                )
                .bind(run.to_string())
                .fetch_all(&self.pool)
                .await?;
                rows.iter()
                    .map(|r| {
                        let metadata: Option<Json<Value>> = r.try_get("metadata")?;
                        Ok(JobTrackingRow {
                            id: r.try_get("id")?,
                            parent_job_id: r.try_get("parent_job_id")?,
                            operation: r.try_get("operation")?,
                            status: r.try_get("status")?,
                            metadata: metadata.map(|m| m.0).unwrap_or(Value::Null),
                            error_message: r.try_get("error_message")?,
                            correlation_id: r.try_get("correlation_id")?,
                        })
                    })
                    .collect()
            }

            async fn active_jobs_for_vm(&self, vm_id: &str, except: Option<RunId>) -> Result<Vec<String>> {
                Ok(sqlx::query_scalar(
                    "SELECT job_id FROM failover_jobs WHERE vm_id = $1 AND (completed_at IS NULL OR lock_key IS NOT NULL) \
                     AND (CAST($2 AS TEXT) IS NULL OR job_id <> $2) \
                     ORDER BY job_id",
                )
                .bind(vm_id)
                .bind(except.map(|r| r.to_string()))
                .fetch_all(&self.pool)
                .await?)
            }
        }

        fn principal_from_row(r: &$row) -> Result<PrincipalRow> {
            let role: String = r.try_get("role")?;
            let kind: String = r.try_get("kind")?;
            Ok(PrincipalRow {
                name: r.try_get("name")?,
                role: Role::parse(&role).ok_or_else(|| StoreError::Corrupt(format!("principals.role {role:?}")))?,
                credential: Credential::parse(&kind)
                    .ok_or_else(|| StoreError::Corrupt(format!("principals.kind {kind:?}")))?,
                token_sha256: r.try_get("token_sha256")?,
                created_at: Timestamp(r.try_get("created_at")?),
                revoked_at: r.try_get::<Option<i64>, _>("revoked_at")?.map(Timestamp),
            })
        }

        #[async_trait]
        impl PrincipalStore for $store {
            async fn add_principal(&self, p: &PrincipalRow) -> Result<()> {
                let mut tx = self.begin_write().await?;
                let active: Option<String> =
                    sqlx::query_scalar("SELECT name FROM principals WHERE name = $1 AND revoked_at IS NULL")
                        .bind(&p.name)
                        .fetch_optional(&mut *tx)
                        .await?;
                if active.is_some() {
                    return Err(StoreError::Conflict {
                        key: format!("principal {}", p.name),
                    });
                }
                sqlx::query("DELETE FROM principals WHERE name = $1")
                    .bind(&p.name)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(
                    "INSERT INTO principals (name, role, kind, token_sha256, created_at) VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(&p.name)
                .bind(p.role.as_str())
                .bind(p.credential.as_str())
                .bind(&p.token_sha256)
                .bind(p.created_at.0)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(())
            }

            async fn principals(&self) -> Result<Vec<PrincipalRow>> {
                let rows = sqlx::query("SELECT * FROM principals ORDER BY name")
                    .fetch_all(&self.pool)
                    .await?;
                rows.iter().map(principal_from_row).collect()
            }

            async fn revoke_principal(&self, name: &str, now: Timestamp) -> Result<bool> {
                let mut tx = self.begin_write().await?;
                let n = sqlx::query("UPDATE principals SET revoked_at = $2 WHERE name = $1 AND revoked_at IS NULL")
                    .bind(name)
                    .bind(now.0)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                tx.commit().await?;
                Ok(n > 0)
            }

            async fn principal_by_token(&self, sha256: &str) -> Result<Option<PrincipalRow>> {
                let row = sqlx::query(
                    "SELECT * FROM principals WHERE token_sha256 = $1 AND kind = 'token' AND revoked_at IS NULL",
                )
                .bind(sha256)
                .fetch_optional(&self.pool)
                .await?;
                row.as_ref().map(principal_from_row).transpose()
            }

            async fn principal_by_certificate(&self, name: &str) -> Result<Option<PrincipalRow>> {
                let row = sqlx::query(
                    "SELECT * FROM principals WHERE name = $1 AND kind = 'certificate' AND revoked_at IS NULL",
                )
                .bind(name)
                .fetch_optional(&self.pool)
                .await?;
                row.as_ref().map(principal_from_row).transpose()
            }
        }

        #[async_trait]
        impl InventoryStore for $store {
            async fn upsert_vm_record(&self, vm: &VmRecord, now: Timestamp) -> Result<()> {
                sqlx::query(
                    "INSERT INTO vms (vm_id, name, record, updated_at) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (vm_id) DO UPDATE SET name = excluded.name, record = excluded.record, updated_at = excluded.updated_at",
                )
                .bind(&vm.vm_id)
                .bind(&vm.name)
                .bind(Json(vm))
                .bind(now.0)
                .execute(&self.pool)
                .await?;
                Ok(())
            }

            async fn vm_record(&self, vm_id: &str) -> Result<Option<VmRecord>> {
                let rec: Option<Json<Value>> = sqlx::query_scalar("SELECT record FROM vms WHERE vm_id = $1")
                    .bind(vm_id)
                    .fetch_optional(&self.pool)
                    .await?;
                rec.map(|r| parse_json("vm record", r.0)).transpose()
            }

            async fn find_vm_record(&self, id_or_name: &str) -> Result<Option<VmRecord>> {
                if let Some(vm) = self.vm_record(id_or_name).await? {
                    return Ok(Some(vm));
                }
                let rec: Option<Json<Value>> =
                    sqlx::query_scalar("SELECT record FROM vms WHERE name = $1 ORDER BY vm_id LIMIT 1")
                        .bind(id_or_name)
                        .fetch_optional(&self.pool)
                        .await?;
                rec.map(|r| parse_json("vm record", r.0)).transpose()
            }

            async fn vm_records(&self) -> Result<Vec<VmRecord>> {
                let recs: Vec<Json<Value>> = sqlx::query_scalar("SELECT record FROM vms ORDER BY name, vm_id")
                    .fetch_all(&self.pool)
                    .await?;
                recs.into_iter().map(|r| parse_json("vm record", r.0)).collect()
            }

            async fn vm_records_after(&self, after: &str, limit: u32) -> Result<Vec<VmRecord>> {
                let recs: Vec<Json<Value>> =
                    sqlx::query_scalar("SELECT record FROM vms WHERE vm_id > $1 ORDER BY vm_id LIMIT $2")
                        .bind(after)
                        .bind(i64::from(limit))
                        .fetch_all(&self.pool)
                        .await?;
                recs.into_iter().map(|r| parse_json("vm record", r.0)).collect()
            }

            async fn set_network_mappings(&self, vm_id: &str, kind: NetworkKind, mappings: &[NetworkMapping]) -> Result<()> {
                let mut tx = self.begin_write().await?;
                sqlx::query("DELETE FROM network_mappings WHERE vm_id = $1 AND kind = $2")
                    .bind(vm_id)
                    .bind(kind.as_str())
                    .execute(&mut *tx)
                    .await?;
                for m in mappings {
                    sqlx::query(
                        "INSERT INTO network_mappings (vm_id, source_network, kind, destination_network_id) VALUES ($1, $2, $3, $4)",
                    )
                    .bind(vm_id)
                    .bind(&m.source_network)
                    .bind(kind.as_str())
                    .bind(&m.destination_network_id)
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
                Ok(())
            }

            async fn network_mappings(&self, vm_id: &str) -> Result<Vec<NetworkMapping>> {
                let rows = sqlx::query(
                    "SELECT source_network, kind, destination_network_id FROM network_mappings WHERE vm_id = $1 \
                     ORDER BY kind, source_network",
                )
                .bind(vm_id)
                .fetch_all(&self.pool)
                .await?;
                rows.iter()
                    .map(|r| {
                        let kind: String = r.try_get("kind")?;
                        Ok(NetworkMapping {
                            vm_id: vm_id.to_string(),
                            source_network: r.try_get("source_network")?,
                            destination_network_id: r.try_get("destination_network_id")?,
                            kind: match kind.as_str() {
                                "test" => NetworkKind::Test,
                                "production" => NetworkKind::Production,
                                other => return Err(StoreError::Corrupt(format!("network mapping kind {other:?}"))),
                            },
                        })
                    })
                    .collect()
            }
        }
    };
}

pub(crate) use inventory_and_jobs;

/// Implements [`super::RunReader`] for a backend. The backend module provides `self.pool`,
/// `Self::key(run)` (how it binds a run id), `run_from_row`, `RUN_COLUMNS` and
/// `self.list_runs_sql(filter)` (dialect-specific).
macro_rules! run_reads {
    ($store:ty) => {
        #[async_trait]
        impl RunReader for $store {
            async fn list_runs(&self, f: &RunFilter) -> Result<Vec<RunRow>> {
                self.list_runs_sql(f).await
            }

            async fn get_run(&self, run: RunId) -> Result<Option<RunRow>> {
                let row = sqlx::query(&format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = $1"))
                    .bind(Self::key(run))
                    .fetch_optional(&self.pool)
                    .await?;
                row.as_ref().map(run_from_row).transpose()
            }

            async fn find_by_request_id(&self, request_id: &str) -> Result<Option<RunRow>> {
                let row = sqlx::query(&format!("SELECT {RUN_COLUMNS} FROM runs WHERE request_id = $1"))
                    .bind(request_id)
                    .fetch_optional(&self.pool)
                    .await?;
                row.as_ref().map(run_from_row).transpose()
            }

            async fn journal(&self, run: RunId, after: i64, limit: u32) -> Result<Vec<JournalEntry>> {
                let rows = sqlx::query(
                    "SELECT seq, record, at FROM journal WHERE run_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
                )
                .bind(Self::key(run))
                .bind(after)
                .bind(limit as i64)
                .fetch_all(&self.pool)
                .await?;
                rows.iter()
                    .map(|r| {
                        let rec: Json<Value> = r.try_get("record")?;
                        Ok(JournalEntry {
                            run_id: run,
                            seq: r.try_get("seq")?,
                            record: parse_json("journal record", rec.0)?,
                            at: Timestamp(r.try_get("at")?),
                        })
                    })
                    .collect()
            }

            async fn definition_source(&self, hash: &str) -> Result<Option<String>> {
                Ok(
                    sqlx::query_scalar("SELECT source FROM definitions WHERE hash = $1")
                        .bind(hash)
                        .fetch_optional(&self.pool)
                        .await?,
                )
            }

            async fn pending_signals(&self, run: RunId) -> Result<Vec<SignalRow>> {
                let rows = sqlx::query(
                    "SELECT id, name, principal FROM signals WHERE run_id = $1 AND consumed_at IS NULL ORDER BY id",
                )
                .bind(Self::key(run))
                .fetch_all(&self.pool)
                .await?;
                rows.iter()
                    .map(|r| {
                        Ok(SignalRow {
                            id: r.try_get("id")?,
                            name: r.try_get("name")?,
                            by: r.try_get("principal")?,
                        })
                    })
                    .collect()
            }

            async fn next_wake_after(&self, now: Timestamp) -> Result<Option<Timestamp>> {
                let v: Option<i64> = sqlx::query_scalar("SELECT MIN(wake_at) FROM runs WHERE wake_at > $1")
                    .bind(now.0)
                    .fetch_one(&self.pool)
                    .await?;
                Ok(v.map(Timestamp))
            }
        }
    };
}

pub(crate) use run_reads;

/// Implements [`super::RunStore`] and [`super::Ledger`] for a backend. The backend provides
/// `self.pool`, `self.wakeup`, `self.write(job)` (its group-commit writer), `self.begin_write()`,
/// `Self::key(run)`, `self.notify(tx)` (tells other processes), the dialect's
/// `Self::FOR_UPDATE` (the row lock of a read that decides a write) and `Self::LEAST`, and how it
/// claims and keeps leases: `claim_due`, `renew_lease`, `drop_lease`, `count_executing`.
macro_rules! run_writes {
    ($store:ty, $backend:literal) => {
        #[async_trait]
        impl RunStore for $store {
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
                self.claim_due(owner, limit, lease_ttl, now).await
            }

            async fn heartbeat(&self, run: RunId, lease: &Lease, expires_at: Timestamp) -> Result<()> {
                self.renew_lease(run, lease, expires_at).await
            }

            async fn checkpoint(&self, cp: Checkpoint) -> Result<CheckpointOutcome> {
                self.write(|reply| WriteJob::Checkpoint(Box::new(cp), reply)).await
            }

            async fn release(&self, run: RunId, lease: &Lease) -> Result<()> {
                self.drop_lease(run, lease).await
            }

            async fn take(&self, run: RunId, owner: &str, lease_ttl: Duration, now: Timestamp) -> Result<Option<Lease>> {
                let token: Option<i64> = sqlx::query_scalar(
                    "UPDATE runs SET lease_owner = $2, lease_expires_at = $3, fencing_token = fencing_token + 1 \
                     WHERE id = $1 AND (lease_owner IS NULL OR lease_expires_at < $4) RETURNING fencing_token",
                )
                .bind(Self::key(run))
                .bind(owner)
                .bind(now.plus(lease_ttl).0)
                .bind(now.0)
                .fetch_optional(&self.pool)
                .await?;
                Ok(token.map(|token| Lease {
                    owner: owner.to_string(),
                    token,
                }))
            }

            fn wakeup(&self) -> Arc<Wakeup> {
                self.wakeup.clone()
            }

            fn backend(&self) -> &'static str {
                $backend
            }

            fn set_executing_count(&self, count: Option<ExecutingCount>) {
                self.count_executing(count)
            }

            async fn signal(&self, run: RunId, name: &str, by: Option<&str>, now: Timestamp) -> Result<SignalOutcome> {
                let mut tx = self.begin_write().await?;
                let status: Option<String> =
                    sqlx::query_scalar(&format!("SELECT status FROM runs WHERE id = $1{}", Self::FOR_UPDATE))
                        .bind(Self::key(run))
                        .fetch_optional(&mut *tx)
                        .await?;
                let status = status.ok_or(StoreError::NotFound(run))?;
                let status =
                    RunStatus::parse(&status).ok_or_else(|| StoreError::Corrupt(format!("status {status:?}")))?;
                if status.is_terminal() {
                    return Ok(SignalOutcome::Finished(status));
                }
                let inserted = sqlx::query(
                    "INSERT INTO signals (run_id, name, created_at, principal) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (run_id, name) DO NOTHING",
                )
                .bind(Self::key(run))
                .bind(name)
                .bind(now.0)
                .bind(by)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if inserted == 0 {
                    return Ok(SignalOutcome::Duplicate);
                }
                // A holding run wakes now to take the signal; any other takes it at its next step.
                sqlx::query(&format!(
                    "UPDATE runs SET signals_pending = signals_pending + 1, \
                     wake_at = CASE WHEN status = 'holding' THEN {}(COALESCE(wake_at, $2), $2) ELSE wake_at END WHERE id = $1",
                    Self::LEAST
                ))
                .bind(Self::key(run))
                .bind(now.0)
                .execute(&mut *tx)
                .await?;
                self.notify(&mut tx).await?;
                tx.commit().await?;
                self.wakeup.wake();
                Ok(SignalOutcome::Accepted)
            }

            async fn cancel(&self, run: RunId, reason: &str, by: Option<&str>, now: Timestamp) -> Result<SignalOutcome> {
                let mut tx = self.begin_write().await?;
                let row = sqlx::query(&format!(
                    "SELECT status, cancel_reason FROM runs WHERE id = $1{}",
                    Self::FOR_UPDATE
                ))
                .bind(Self::key(run))
                .fetch_optional(&mut *tx)
                .await?
                .ok_or(StoreError::NotFound(run))?;
                let status: String = row.try_get("status")?;
                let status =
                    RunStatus::parse(&status).ok_or_else(|| StoreError::Corrupt(format!("status {status:?}")))?;
                if status.is_terminal() {
                    return Ok(SignalOutcome::Finished(status));
                }
                if row.try_get::<Option<String>, _>("cancel_reason")?.is_some() {
                    return Ok(SignalOutcome::Duplicate);
                }
                sqlx::query(&format!(
                    "UPDATE runs SET cancel_reason = $2, cancel_principal = $4, cancel_pending = TRUE, \
                     wake_at = {}(COALESCE(wake_at, $3), $3) WHERE id = $1",
                    Self::LEAST
                ))
                .bind(Self::key(run))
                .bind(reason)
                .bind(now.0)
                .bind(by)
                .execute(&mut *tx)
                .await?;
                self.notify(&mut tx).await?;
                tx.commit().await?;
                self.wakeup.wake();
                Ok(SignalOutcome::Accepted)
            }
        }

        #[async_trait]
        impl Ledger for $store {
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
                    .bind(Self::key(row.run_id))
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
                .bind(run.map(Self::key))
                .fetch_all(&self.pool)
                .await?;
                rows.iter()
                    .map(|r| {
                        Ok(LedgerRow {
                            key: r.try_get("key")?,
                            run_id: r.run_id("run_id")?,
                            step: r.try_get("step")?,
                            attempt: r.try_get("attempt")?,
                            kind: r.try_get("kind")?,
                        })
                    })
                    .collect()
            }
        }
    };
}

pub(crate) use run_writes;
