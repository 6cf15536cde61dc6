//! What a store says about itself, for `tern bench`, `/metrics` and the health probe: both
//! backends ask it in the same SQL.

use super::{Result, StoreError};
use crate::domain::run::RunStatus;

/// Reads a `status` column's text.
pub(crate) fn status_of(text: String) -> Result<RunStatus> {
    RunStatus::parse(&text).ok_or_else(|| StoreError::Corrupt(format!("status {text:?}")))
}

/// Implements [`super::Diagnostics`] for a backend. The backend provides `self.pool` and
/// `self.durability_settings()` (dialect-specific).
macro_rules! diagnostics {
    ($store:ty) => {
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
                        Ok((
                            super::diagnostics::status_of(r.try_get("status")?)?,
                            r.try_get("n")?,
                        ))
                    })
                    .collect()
            }

            async fn gauges(&self, now: Timestamp) -> Result<Gauges> {
                let rows =
                    sqlx::query("SELECT definition, status, COUNT(*) AS n FROM runs GROUP BY definition, status")
                        .fetch_all(&self.pool)
                        .await?;
                let runs = rows
                    .iter()
                    .map(|r| {
                        Ok((
                            r.try_get("definition")?,
                            super::diagnostics::status_of(r.try_get("status")?)?,
                            r.try_get("n")?,
                        ))
                    })
                    .collect::<Result<Vec<_>>>()?;
                // The claim's own condition: due, and no live lease.
                let (due, oldest): (i64, Option<i64>) = sqlx::query_as(
                    "SELECT COUNT(*), MIN(wake_at) FROM runs WHERE wake_at IS NOT NULL AND wake_at <= $1 \
                     AND (lease_expires_at IS NULL OR lease_expires_at < $1)",
                )
                .bind(now.0)
                .fetch_one(&self.pool)
                .await?;
                let needs_operator: i64 =
                    sqlx::query_scalar("SELECT COUNT(*) FROM failover_jobs WHERE status = 'needs_operator'")
                        .fetch_one(&self.pool)
                        .await?;
                Ok(Gauges {
                    runs,
                    due,
                    oldest_due: oldest.map(Timestamp),
                    needs_operator,
                })
            }

            async fn ping(&self) -> Result<()> {
                sqlx::query("SELECT 1").execute(&self.pool).await?;
                Ok(())
            }
        }
    };
}

pub(crate) use diagnostics;
