//! The JSON shapes of jobs, steps and readiness reports, from the gRPC messages: the seeds'
//! field names, and what Tern knows besides.

use std::collections::BTreeMap;
use std::time::{Duration, UNIX_EPOCH};

use serde::Serialize;
use serde_json::Value;

use crate::api::pb;

/// An RFC 3339 time (UTC, milliseconds), as the seeds write them.
pub(super) fn time(t: &Option<prost_types::Timestamp>) -> Option<String> {
    let t = t.as_ref()?;
    let at = UNIX_EPOCH + Duration::new(t.seconds.max(0) as u64, t.nanos.clamp(0, 999_999_999) as u32);
    Some(humantime::format_rfc3339_millis(at).to_string())
}

/// Why a job or a step failed.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorView {
    /// A machine code, e.g. SNAPSHOT_FAILED, VM_CREATE_FAILED.
    pub code: String,
    pub message: String,
}

pub(super) fn error_view(e: &Option<pb::Error>) -> Option<ErrorView> {
    e.as_ref()
        .filter(|e| !e.code.is_empty() || !e.message.is_empty())
        .map(|e| ErrorView {
            code: e.code.clone(),
            message: e.message.clone(),
        })
}

/// One step as the journal tells it: each phase of it (forward, teardown, rollback) is a step.
#[derive(Serialize, utoipa::ToSchema)]
pub struct StepView {
    /// The seeds' step name, e.g. validation, snapshot, test-vm-creation.
    pub step_name: String,
    /// forward, teardown or rollback.
    pub phase: String,
    /// pending, running, retrying, completed, skipped or failed.
    pub status: String,
    /// The attempt running or last run (1 is the first).
    pub attempt: u32,
    pub started_at: Option<String>,
    pub completed_at: Option<String>,
    pub error: Option<ErrorView>,
}

/// Who resolved a needs_operator job, and why.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ResolutionView {
    pub resolved_by: String,
    pub reason: String,
    /// Resolved in spite of the differences listed.
    pub forced: bool,
    pub differences: Vec<String>,
    pub resolved_at: Option<String>,
}

/// A failover job: the seeds' fields, and what Tern knows besides.
#[derive(Serialize, utoipa::ToSchema)]
pub struct JobView {
    /// Tern's job id (a UUID), not the seeds' `enhanced-test-failover-...` form.
    pub job_id: String,
    pub vm_id: String,
    pub vm_name: String,
    /// test or live.
    pub job_type: String,
    /// pending, validating, snapshotting, executing, creating_vm, switching_volume,
    /// powering_on, testing, cleanup, reverting, completed, failed, cancelled, needs_operator
    /// (the VM stays locked until resolved), resolved.
    pub status: String,
    /// The engine's coarse status: pending, running, sleeping, holding, compensating,
    /// completed, failed, cancelled, needs_operator, resolved.
    pub run_status: String,
    /// 0 to 100.
    pub progress: f64,
    pub current_step: String,
    pub snapshot_name: String,
    /// `snapshot_name` under the seeds' name.
    pub linstor_snapshot_name: String,
    pub destination_vm_id: String,
    pub correlation_id: String,
    pub created_at: Option<String>,
    pub started_at: Option<String>,
    pub completed_at: Option<String>,
    /// When auto-cleanup will end the test (while it holds with a timer).
    pub cleanup_at: Option<String>,
    /// The error's message, as the seeds' `error_message`.
    pub error_message: Option<String>,
    pub error: Option<ErrorView>,
    /// Each source network and the CloudStack network its NIC was put on.
    pub network_mappings: BTreeMap<String, String>,
    pub resolution: Option<ResolutionView>,
    /// The sequence of the job's last journal entry (where an event stream would resume).
    pub last_sequence: i64,
    /// Forward, teardown and rollback steps, in order (empty in lists).
    pub steps: Vec<StepView>,
}

impl From<pb::FailoverJob> for JobView {
    fn from(j: pb::FailoverJob) -> JobView {
        let error = error_view(&j.error);
        JobView {
            error_message: error.as_ref().map(|e| e.message.clone()),
            error,
            created_at: time(&j.created_at),
            started_at: time(&j.started_at),
            completed_at: time(&j.completed_at),
            cleanup_at: time(&j.cleanup_at),
            resolution: j.resolution.map(|r| ResolutionView {
                resolved_at: time(&r.resolved_at),
                resolved_by: r.resolved_by,
                reason: r.reason,
                forced: r.forced,
                differences: r.differences,
            }),
            steps: j
                .steps
                .into_iter()
                .map(|s| StepView {
                    started_at: time(&s.started_at),
                    completed_at: time(&s.completed_at),
                    error: error_view(&s.error),
                    step_name: s.name,
                    phase: s.phase,
                    status: s.status,
                    attempt: s.attempt,
                })
                .collect(),
            network_mappings: j.network_mappings.into_iter().collect(),
            linstor_snapshot_name: j.snapshot_name.clone(),
            snapshot_name: j.snapshot_name,
            job_id: j.job_id,
            vm_id: j.vm_id,
            vm_name: j.vm_name,
            job_type: j.job_type,
            status: j.status,
            run_status: j.run_status,
            progress: f64::from(j.progress_percent),
            current_step: j.current_step,
            destination_vm_id: j.destination_vm_id,
            correlation_id: j.correlation_id,
            last_sequence: j.last_sequence,
        }
    }
}

/// One readiness check.
#[derive(Serialize, utoipa::ToSchema)]
pub struct CheckView {
    /// VM Existence, Active Jobs, Sync Status, Network Mappings, Volume State.
    pub check_name: String,
    /// critical or warning.
    pub check_type: String,
    /// pass or fail.
    pub status: String,
    pub message: String,
    #[schema(value_type = Object)]
    pub details: Value,
}

/// The readiness report as the seeds' `validation_result`.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ValidationResult {
    pub vm_id: String,
    pub is_ready: bool,
    /// 0 to 100.
    pub readiness_score: f64,
    pub checks: Vec<CheckView>,
    /// The messages of the warning checks that failed.
    pub warnings: Vec<String>,
    /// The messages of the critical checks that failed.
    pub errors: Vec<String>,
}

impl From<pb::ReadinessReport> for ValidationResult {
    fn from(r: pb::ReadinessReport) -> ValidationResult {
        let failed = |kind: &str| -> Vec<String> {
            r.checks
                .iter()
                .filter(|c| c.status != "pass" && c.check_type == kind)
                .map(|c| format!("{}: {}", c.check_name, c.message))
                .collect()
        };
        let (warnings, errors) = (failed("warning"), failed("critical"));
        ValidationResult {
            warnings,
            errors,
            checks: r
                .checks
                .into_iter()
                .map(|c| CheckView {
                    details: serde_json::from_str(&c.details_json).unwrap_or(Value::Null),
                    check_name: c.check_name,
                    check_type: c.check_type,
                    status: c.status,
                    message: c.message,
                })
                .collect(),
            vm_id: r.vm_id,
            is_ready: r.is_ready,
            readiness_score: r.readiness_score,
        }
    }
}

/// A page of a list: the seeds' `data` and `total`, and the token of the next page.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Page<T> {
    pub success: bool,
    pub data: Vec<T>,
    /// How many items this page holds.
    pub total: usize,
    /// Empty on the last page.
    pub next_page_token: String,
}

impl<T> Page<T> {
    pub fn new(data: Vec<T>, next_page_token: String) -> Page<T> {
        Page {
            success: true,
            total: data.len(),
            data,
            next_page_token,
        }
    }
}
