//! What both backends say in the same SQL, written once: the inventory and the job read model
//! (both speak `$n` parameters and `ON CONFLICT`, and store those tables' ids as text), and
//! the run reads (a run id bound as each backend stores it).

/// Implements [`super::JobStore`] and [`super::InventoryStore`] for a backend. The backend
/// module provides `self.pool`, `self.begin_write()`, `self.list_jobs(filter)` (paging is
/// dialect-specific) and `job_from_row`.
macro_rules! inventory_and_jobs {
    ($store:ty) => {
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
                    "SELECT id, parent_job_id, operation, status, metadata, error_message FROM job_tracking \
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
                        })
                    })
                    .collect()
            }

            async fn active_jobs_for_vm(&self, vm_id: &str, except: Option<RunId>) -> Result<Vec<String>> {
                Ok(sqlx::query_scalar(
                    "SELECT job_id FROM failover_jobs WHERE vm_id = $1 AND completed_at IS NULL AND (CAST($2 AS TEXT) IS NULL OR job_id <> $2) \
                     ORDER BY job_id",
                )
                .bind(vm_id)
                .bind(except.map(|r| r.to_string()))
                .fetch_all(&self.pool)
                .await?)
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

/// Implements [`super::RunReader`] and [`super::Diagnostics`] for a backend. The backend
/// module provides `self.pool`, `Self::key(run)` (how it binds a run id), `run_from_row`,
/// `RUN_COLUMNS`, `self.list_runs_sql(filter)` and `self.durability_settings()` (dialect-specific).
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
                let rows =
                    sqlx::query("SELECT id, name FROM signals WHERE run_id = $1 AND consumed_at IS NULL ORDER BY id")
                        .bind(Self::key(run))
                        .fetch_all(&self.pool)
                        .await?;
                rows.iter()
                    .map(|r| {
                        Ok(SignalRow {
                            id: r.try_get("id")?,
                            name: r.try_get("name")?,
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

        #[async_trait]
        impl Diagnostics for $store {
            async fn durability(&self) -> Result<String> {
                self.durability_settings().await
            }

            async fn journal_rows(&self) -> Result<i64> {
                Ok(sqlx::query_scalar("SELECT COUNT(*) FROM journal")
                    .fetch_one(&self.pool)
                    .await?)
            }

            async fn count_by_status(&self) -> Result<Vec<(RunStatus, i64)>> {
                let rows = sqlx::query("SELECT status, COUNT(*) AS n FROM runs GROUP BY status")
                    .fetch_all(&self.pool)
                    .await?;
                rows.iter()
                    .map(|r| {
                        let s: String = r.try_get("status")?;
                        let st = RunStatus::parse(&s).ok_or_else(|| StoreError::Corrupt(format!("status {s:?}")))?;
                        Ok((st, r.try_get("n")?))
                    })
                    .collect()
            }
        }
    };
}

pub(crate) use run_reads;
