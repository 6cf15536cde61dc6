//! Test actions: each records its side effect in the `ledger` table so crash tests can count
//! how often a side effect really happened. Their behaviour (failures, delays) is driven by the
//! run's input under `"test"`:
//!
//! ```json
//! {"test": {"fail": {"b": {"times": 2, "class": "retryable"}},
//!           "fail_undo": {"a": {"times": 9, "class": "permanent"}},
//!           "sleep_ms": {"c": 200}}}
//! ```
//! A failure applies to attempts `1..=times`; `times` absent means every attempt.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{json, Value};

use crate::crash;
use crate::engine::action::{Action, ActionError, StepInput};
use crate::store::{LedgerRow, Store};

fn knob<'a>(step: &'a StepInput, table: &str) -> Option<&'a Value> {
    step.input.get("test")?.get(table)?.get(&step.step)
}

async fn behave(step: &StepInput, fail_table: &str) -> Result<(), ActionError> {
    if let Some(ms) = knob(step, "sleep_ms").and_then(Value::as_u64) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if let Some(f) = knob(step, fail_table) {
        let times = f.get("times").and_then(Value::as_u64).unwrap_or(u64::MAX);
        if u64::from(step.attempt) <= times {
            let msg = format!("injected failure of {} attempt {}", step.step, step.attempt);
            return Err(match f.get("class").and_then(Value::as_str) {
                Some("permanent") => ActionError::permanent("INJECTED", msg),
                _ => ActionError::retryable("INJECTED", msg),
            });
        }
    }
    Ok(())
}

async fn record(store: &Arc<dyn Store>, step: &StepInput, kind: &str, adopt: bool) -> Result<bool, ActionError> {
    let row = LedgerRow {
        key: step.idempotency_key.clone(),
        run_id: step.run_id,
        step: step.step.clone(),
        attempt: i64::from(step.attempt),
        kind: kind.to_string(),
    };
    Ok(store.ledger_record(&row, adopt).await?)
}

/// A side effect that adopts an earlier attempt's (look up by key, create if absent).
pub struct Effect {
    pub store: Arc<dyn Store>,
}

#[async_trait]
impl Action for Effect {
    async fn run(&self, step: StepInput) -> Result<Value, ActionError> {
        behave(&step, "fail").await?;
        let created = record(&self.store, &step, "effect", true).await?;
        crash::point("after_effect");
        Ok(json!({"resource": step.idempotency_key, "adopted": !created}))
    }
}

/// An external asynchronous job: issue it (adopting an earlier issue), checkpoint its id as
/// progress, then poll. A resumed attempt that finds the id in its progress polls the same job
/// and issues nothing.
pub struct Job {
    pub store: Arc<dyn Store>,
}

#[async_trait]
impl Action for Job {
    async fn run(&self, step: StepInput) -> Result<Value, ActionError> {
        let job_id = match step
            .progress
            .as_ref()
            .and_then(|p| p.get("job_id"))
            .and_then(Value::as_str)
        {
            Some(id) => id.to_string(),
            None => {
                behave(&step, "fail").await?;
                record(&self.store, &step, "job", true).await?;
                let id = format!("job-{}", step.idempotency_key);
                step.checkpoint.save(json!({"job_id": id})).await?;
                crash::point("after_job_progress");
                id
            }
        };
        let poll = knob(&step, "poll_ms").and_then(Value::as_u64).unwrap_or(5);
        tokio::time::sleep(Duration::from_millis(poll)).await;
        Ok(json!({"job_id": job_id}))
    }
}

/// Undoes an `Effect` or `Job`: records one undo per step (adopting an earlier attempt's).
pub struct Undo {
    pub store: Arc<dyn Store>,
}

#[async_trait]
impl Action for Undo {
    async fn run(&self, step: StepInput) -> Result<Value, ActionError> {
        behave(&step, "fail_undo").await?;
        let created = record(&self.store, &step, "undo", true).await?;
        crash::point("after_effect");
        Ok(json!({"undone": step.step, "adopted": !created}))
    }
}
