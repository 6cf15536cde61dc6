//! Transitions an operator asks for on a run no worker drives: resolving a run that needs an
//! operator. The same rule as a worker's: the state machine decides, the transition is
//! committed under a lease with the run's journal position as the guard.

use super::{driver, machine, Engine, EngineError};
use crate::domain::run::{Resolution, RunState};
use crate::domain::{RunId, Timestamp};
use crate::store::{projection, Checkpoint, RunRow};

impl Engine {
    /// Resolves a `needs_operator` run: journals who resolved it, why and (when forced) what
    /// still differed, and frees what it held (a failover's VM). Checking the world is the
    /// caller's: the engine knows no cloud.
    pub async fn resolve(&self, run: RunId, resolution: Resolution) -> Result<RunRow, EngineError> {
        let now = Timestamp::now();
        let row = self.store.get_run(run).await?.ok_or(EngineError::NotFound(run))?;
        if !matches!(row.state, RunState::NeedsOperator { .. }) {
            return Err(EngineError::Finished {
                run,
                status: row.status.as_str(),
            });
        }
        let lease = self
            .store
            .take(run, &self.config.worker_id, self.config.lease_ttl, now)
            .await?
            .ok_or(EngineError::Busy {
                field: "run".into(),
                value: run.to_string(),
            })?;
        // Read again under the lease: the position the checkpoint is guarded by.
        let row = self.store.get_run(run).await?.ok_or(EngineError::NotFound(run))?;
        let def = self.pinned(&row.definition_hash).await?;
        let m = machine::Machine {
            run_id: run,
            def: &def,
            input: &row.input,
        };
        let t = match m.transition(&row.state, &machine::Event::Resolve { resolution }, now) {
            Ok(t) => t,
            Err(e) => {
                self.store.release(run, &lease).await?;
                return Err(e.into());
            }
        };
        let display = def.display_status(&t.state);
        let cp = Checkpoint {
            run_id: run,
            lease,
            expected_seq: row.last_seq,
            expected_status: row.status,
            current_step: driver::current_step(&def, &t.state),
            context: None,
            wake_at: None,
            wake_on_signal: false,
            release: true,
            consumed_signals: vec![],
            consumed_cancel: false,
            projection: projection::project(&t.records, &display, &row.correlation_id),
            display_status: display,
            state: t.state.clone(),
            records: t.records.clone(),
            now,
        };
        let out = self.store.checkpoint(cp).await?;
        let first_seq = out.last_seq - t.records.len() as i64 + 1;
        self.committed(run, first_seq, &t.records, now, Some(&t.state));
        self.store.get_run(run).await?.ok_or(EngineError::NotFound(run))
    }
}
