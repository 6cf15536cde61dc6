//! The seeds' `failover_jobs` and `job_tracking` tables, kept up to date as projections of
//! the journal in the same transaction as the journal write.
//!
//! This module is pure: it turns journal records into the updates a backend applies.

use serde_json::{json, Value};

use crate::domain::run::Phase;
use crate::domain::run::{Record, RunStatus};

/// Updates to the projection rows of one run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Projection {
    /// The user-visible status (`failover_jobs.status`).
    pub status: Option<String>,
    pub snapshot_name: Option<String>,
    pub destination_vm_id: Option<String>,
    /// The network mappings the new VM got (JSON text: source network → CloudStack network).
    pub network_mappings: Option<String>,
    pub error_message: Option<String>,
    pub started: bool,
    pub completed: bool,
    /// The run gives up its exclusive key (a failover's VM): it finished on its own, or an
    /// operator resolved it. A run that needs an operator keeps it.
    pub release_lock: bool,
    pub tracking: Vec<TrackingUpdate>,
    /// The run's correlation id, which every `job_tracking` row it creates carries.
    pub correlation_id: String,
}

/// One `job_tracking` row (keyed by run and operation), created or updated.
#[derive(Debug, Clone, PartialEq)]
pub struct TrackingUpdate {
    pub operation: String,
    /// pending | executing | completed | failed | cancelled
    pub status: &'static str,
    pub metadata: Value,
    pub error_message: Option<String>,
}

fn operation(phase: Phase, step: &str) -> String {
    match phase {
        Phase::Forward => step.to_string(),
        Phase::Teardown => format!("teardown:{step}"),
    }
}

fn rollback(step: &str) -> String {
    format!("rollback:{step}")
}

/// Fields any step output or progress may carry that the seeds' failover_jobs row shows.
fn pick(p: &mut Projection, v: &Value) {
    if let Some(s) = v.get("snapshot_name").and_then(Value::as_str) {
        p.snapshot_name = Some(s.to_string());
    }
    if let Some(s) = v.get("destination_vm_id").and_then(Value::as_str) {
        p.destination_vm_id = Some(s.to_string());
    }
    if let Some(m) = v.get("network_mappings").filter(|m| m.is_object()) {
        p.network_mappings = Some(m.to_string());
    }
}

/// Builds the projection updates for a batch of journal records of the run with
/// `correlation_id`.
pub fn project(records: &[Record], display_status: &str, correlation_id: &str) -> Projection {
    let mut p = Projection {
        status: Some(display_status.to_string()),
        correlation_id: correlation_id.to_string(),
        ..Projection::default()
    };
    for r in records {
        match r {
            Record::RunSubmitted { .. } => {}
            Record::StepSkipped { phase, step, reason } => p.tracking.push(TrackingUpdate {
                operation: operation(*phase, step),
                status: "cancelled",
                metadata: json!({"skipped": reason}),
                error_message: None,
            }),
            Record::StepStarted {
                phase,
                step,
                attempt,
                idempotency_key,
            } => {
                p.started = true;
                p.tracking.push(TrackingUpdate {
                    operation: operation(*phase, step),
                    status: "executing",
                    metadata: json!({"attempt": attempt, "idempotency_key": idempotency_key}),
                    error_message: None,
                })
            }
            Record::StepProgress { data, .. } | Record::CompensationProgress { data, .. } => pick(&mut p, data),
            Record::StepSucceeded {
                phase,
                step,
                attempt,
                output,
            } => {
                pick(&mut p, output);
                p.tracking.push(TrackingUpdate {
                    operation: operation(*phase, step),
                    status: "completed",
                    metadata: json!({"attempt": attempt, "output": output}),
                    error_message: None,
                })
            }
            Record::StepFailed {
                phase,
                step,
                attempt,
                error,
                retry_at,
            } => p.tracking.push(TrackingUpdate {
                operation: operation(*phase, step),
                status: if retry_at.is_some() { "pending" } else { "failed" },
                metadata: json!({"attempt": attempt, "code": error.code, "retry_at": retry_at}),
                error_message: Some(error.message.clone()),
            }),
            Record::CompensationStarted {
                step,
                attempt,
                idempotency_key,
            } => p.tracking.push(TrackingUpdate {
                operation: rollback(step),
                status: "executing",
                metadata: json!({"attempt": attempt, "idempotency_key": idempotency_key}),
                error_message: None,
            }),
            Record::CompensationSucceeded { step, attempt } => p.tracking.push(TrackingUpdate {
                operation: rollback(step),
                status: "completed",
                metadata: json!({"attempt": attempt}),
                error_message: None,
            }),
            Record::CompensationFailed {
                step,
                attempt,
                error,
                retry_at,
            } => p.tracking.push(TrackingUpdate {
                operation: rollback(step),
                status: if retry_at.is_some() { "pending" } else { "failed" },
                metadata: json!({"attempt": attempt, "code": error.code, "retry_at": retry_at}),
                error_message: Some(error.message.clone()),
            }),
            Record::TimerSet { .. } | Record::TimerFired { .. } | Record::SignalReceived { .. } => {}
            Record::CancelRequested { .. } => {}
            Record::RunFinished { status, error, undone } => {
                p.completed = true;
                p.release_lock = *status != RunStatus::NeedsOperator;
                if let Some(e) = error {
                    let mut msg = format!("{}: {}", e.code, e.message);
                    if *status == RunStatus::NeedsOperator && !undone.is_empty() {
                        msg.push_str(&format!(" (not undone: {})", undone.join(", ")));
                    }
                    p.error_message = Some(msg);
                }
            }
            Record::Resolved { .. } => p.release_lock = true,
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::StepError;

    #[test]
    fn records_become_tracking_rows_and_job_fields() {
        let recs = vec![
            Record::StepSucceeded {
                phase: Phase::Forward,
                step: "snapshot".into(),
                attempt: 1,
                output: json!({"snapshot_name": "tern-1"}),
            },
            Record::StepSucceeded {
                phase: Phase::Forward,
                step: "test-vm-creation".into(),
                attempt: 1,
                output: json!({"destination_vm_id": "vm-9", "network_mappings": {"VM Network": "net-1"}}),
            },
            Record::StepStarted {
                phase: Phase::Teardown,
                step: "stop".into(),
                attempt: 1,
                idempotency_key: "k".into(),
            },
            Record::RunFinished {
                status: RunStatus::NeedsOperator,
                error: Some(StepError::permanent("E", "stuck")),
                undone: vec!["snapshot".into()],
            },
        ];
        let p = project(&recs, "needs_operator", "corr-1");
        assert_eq!(p.snapshot_name.as_deref(), Some("tern-1"));
        assert_eq!(p.destination_vm_id.as_deref(), Some("vm-9"));
        assert_eq!(p.network_mappings.as_deref(), Some(r#"{"VM Network":"net-1"}"#));
        assert_eq!(p.correlation_id, "corr-1");
        assert_eq!(p.tracking[0].status, "completed");
        assert_eq!(p.tracking[2].operation, "teardown:stop");
        assert!(p.completed);
        assert!(!p.release_lock, "a run that needs an operator keeps its VM");
        assert!(p.error_message.unwrap().contains("not undone: snapshot"));
        let resolved = [Record::Resolved {
            by: "ops".into(),
            reason: "volume reattached by hand".into(),
            forced: false,
            differences: vec![],
        }];
        let p = project(&resolved, "resolved", "c");
        assert!(p.release_lock && !p.completed);
        let done = [Record::RunFinished {
            status: RunStatus::Completed,
            error: None,
            undone: vec![],
        }];
        assert!(project(&done, "completed", "c").release_lock);
    }
}
