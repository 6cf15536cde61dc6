//! Conversions between the generated proto types and the domain: timestamps, the step view a
//! run's journal folds into, jobs, workflows, VMs and readiness reports.

use std::collections::HashMap;

use serde_json::Value;

use super::pb;
use crate::domain::inventory::{split_disks, Disk, ListedDisk, NetworkKind, NetworkMapping, Nic, VmRecord};
use crate::domain::run::Phase;
use crate::domain::run::{Record, RunState};
use crate::domain::validation::{CheckStatus, CheckType, ReadinessReport};
use crate::domain::{StepError, Timestamp};
use crate::store::{FailoverJobRow, JournalEntry, RunRow};
use crate::workflow::Definition;

pub fn timestamp(t: Timestamp) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.0.div_euclid(1000),
        nanos: (t.0.rem_euclid(1000) * 1_000_000) as i32,
    }
}

pub fn from_timestamp(t: &prost_types::Timestamp) -> Timestamp {
    Timestamp(
        t.seconds
            .saturating_mul(1000)
            .saturating_add(i64::from(t.nanos) / 1_000_000),
    )
}

fn error(e: &StepError) -> pb::Error {
    pb::Error {
        code: e.code.clone(),
        message: e.message.clone(),
    }
}

/// Why a terminal run did not complete (None while it runs or when it completed).
pub fn run_error(state: &RunState) -> Option<pb::Error> {
    match state {
        RunState::Failed { step, error: e } => Some(pb::Error {
            code: e.code.clone(),
            message: format!("step {step}: {}", e.message),
        }),
        RunState::NeedsOperator { step, error: e, undone } => Some(pb::Error {
            code: e.code.clone(),
            message: format!(
                "step {step}: {}; left for an operator: {}",
                e.message,
                undone.join(", ")
            ),
        }),
        RunState::Resolved {
            step,
            error: e,
            resolution,
            ..
        } => Some(pb::Error {
            code: e.code.clone(),
            message: format!(
                "step {step}: {}; resolved by {}{}: {}",
                e.message,
                resolution.by,
                if resolution.forced { " (forced)" } else { "" },
                resolution.reason
            ),
        }),
        RunState::Cancelled { reason } => Some(pb::Error {
            code: "CANCELLED".into(),
            message: reason.clone(),
        }),
        RunState::Pending
        | RunState::Running { .. }
        | RunState::Backoff { .. }
        | RunState::Holding { .. }
        | RunState::Compensating { .. }
        | RunState::CompensationBackoff { .. }
        | RunState::Completed => None,
    }
}

/// The steps of a run: every step of its definition (pending until the journal says more),
/// then each compensation the journal shows, as phase "rollback".
pub fn steps(def: &Definition, journal: &[JournalEntry]) -> Vec<pb::Step> {
    let mut out: Vec<pb::Step> = Vec::new();
    let mut index: HashMap<(String, String), usize> = HashMap::new();
    for phase in [Phase::Forward, Phase::Teardown] {
        for s in def.steps(phase) {
            index.insert((phase.as_str().to_string(), s.name.clone()), out.len());
            out.push(pb::Step {
                name: s.name.clone(),
                phase: phase.as_str().into(),
                status: "pending".into(),
                ..Default::default()
            });
        }
    }
    let mut slot = |phase: &str, name: &str| -> usize {
        let key = (phase.to_string(), name.to_string());
        if let Some(i) = index.get(&key) {
            return *i;
        }
        out.push(pb::Step {
            name: name.into(),
            phase: phase.into(),
            status: "pending".into(),
            ..Default::default()
        });
        index.insert(key, out.len() - 1);
        out.len() - 1
    };
    struct Change {
        slot: usize,
        status: &'static str,
        attempt: u32,
        error: Option<StepError>,
        done: bool,
        at: Timestamp,
    }
    let mut changes = Vec::new();
    for e in journal {
        let (i, status, attempt, err, done) = match &e.record {
            Record::StepSkipped { phase, step, .. } => (slot(phase.as_str(), step), "skipped", 0, None, true),
            Record::StepStarted {
                phase, step, attempt, ..
            } => (slot(phase.as_str(), step), "running", *attempt, None, false),
            Record::StepSucceeded {
                phase, step, attempt, ..
            } => (slot(phase.as_str(), step), "completed", *attempt, None, true),
            Record::StepFailed {
                phase,
                step,
                attempt,
                error,
                retry_at,
            } => (
                slot(phase.as_str(), step),
                if retry_at.is_some() { "retrying" } else { "failed" },
                *attempt,
                Some(error.clone()),
                retry_at.is_none(),
            ),
            Record::CompensationStarted { step, attempt, .. } => {
                (slot("rollback", step), "running", *attempt, None, false)
            }
            Record::CompensationSucceeded { step, attempt } => {
                (slot("rollback", step), "completed", *attempt, None, true)
            }
            Record::CompensationFailed {
                step,
                attempt,
                error,
                retry_at,
            } => (
                slot("rollback", step),
                if retry_at.is_some() { "retrying" } else { "failed" },
                *attempt,
                Some(error.clone()),
                retry_at.is_none(),
            ),
            Record::RunSubmitted { .. }
            | Record::StepProgress { .. }
            | Record::CompensationProgress { .. }
            | Record::TimerSet { .. }
            | Record::TimerFired { .. }
            | Record::SignalReceived { .. }
            | Record::CancelRequested { .. }
            | Record::RunFinished { .. }
            | Record::Resolved { .. } => continue,
        };
        changes.push(Change {
            slot: i,
            status,
            attempt,
            error: err,
            done,
            at: e.at,
        });
    }
    for Change {
        slot,
        status,
        attempt,
        error: err,
        done,
        at,
    } in changes
    {
        let s = &mut out[slot];
        s.status = status.into();
        if attempt > 0 {
            s.attempt = attempt;
        }
        if s.started_at.is_none() && status != "skipped" {
            s.started_at = Some(timestamp(at));
        }
        if done {
            s.completed_at = Some(timestamp(at));
        }
        s.error = err.as_ref().map(error);
    }
    out
}

/// The share of forward and teardown steps finished (completed or skipped); 100 once completed.
pub fn progress(state: &RunState, steps: &[pb::Step]) -> u32 {
    if matches!(state, RunState::Completed) {
        return 100;
    }
    let own: Vec<&pb::Step> = steps.iter().filter(|s| s.phase != "rollback").collect();
    if own.is_empty() {
        return 0;
    }
    let done = own
        .iter()
        .filter(|s| s.status == "completed" || s.status == "skipped")
        .count();
    (done * 100 / own.len()) as u32
}

/// A journal entry on the wire.
pub fn entry(e: &JournalEntry) -> pb::JournalEntry {
    let (step, phase, attempt) = match &e.record {
        Record::StepSkipped { phase, step, .. } => (step.clone(), phase.as_str(), 0),
        Record::StepStarted {
            phase, step, attempt, ..
        }
        | Record::StepProgress {
            phase, step, attempt, ..
        }
        | Record::StepSucceeded {
            phase, step, attempt, ..
        }
        | Record::StepFailed {
            phase, step, attempt, ..
        } => (step.clone(), phase.as_str(), *attempt),
        Record::CompensationStarted { step, attempt, .. }
        | Record::CompensationProgress { step, attempt, .. }
        | Record::CompensationSucceeded { step, attempt }
        | Record::CompensationFailed { step, attempt, .. } => (step.clone(), "rollback", *attempt),
        Record::RunSubmitted { .. }
        | Record::TimerSet { .. }
        | Record::TimerFired { .. }
        | Record::SignalReceived { .. }
        | Record::CancelRequested { .. }
        | Record::RunFinished { .. }
        | Record::Resolved { .. } => (String::new(), "", 0),
    };
    pb::JournalEntry {
        sequence: e.seq,
        at: Some(timestamp(e.at)),
        kind: e.record.kind().into(),
        step,
        phase: phase.into(),
        attempt,
        record_json: serde_json::to_string(&e.record).unwrap_or_default(),
    }
}

pub fn terminal(run: &RunRow) -> pb::Terminal {
    terminal_of(&run.state, run.last_seq)
}

/// The terminal event of a run that ended in `state` with `last_seq` as its last entry.
pub fn terminal_of(state: &RunState, last_seq: i64) -> pb::Terminal {
    pb::Terminal {
        status: state.status().as_str().into(),
        error: run_error(state),
        last_sequence: last_seq,
    }
}

fn json_text(v: &impl serde::Serialize) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

pub fn workflow(run: &RunRow, def: &Definition, journal: &[JournalEntry], created: bool) -> pb::Workflow {
    pb::Workflow {
        run_id: run.id.to_string(),
        definition: run.definition.clone(),
        definition_hash: run.definition_hash.clone(),
        status: run.status.as_str().into(),
        display_status: run.display_status.clone(),
        current_step: run.current_step.clone().unwrap_or_default(),
        input_json: json_text(&run.input),
        context_json: json_text(&run.context),
        correlation_id: run.correlation_id.clone(),
        last_sequence: run.last_seq,
        created_at: Some(timestamp(run.created_at)),
        updated_at: Some(timestamp(run.updated_at)),
        started_at: run.started_at.map(timestamp),
        completed_at: run.completed_at.map(timestamp),
        error: run_error(&run.state),
        steps: steps(def, journal),
        created,
    }
}

/// A failover job: the run, its `failover_jobs` row and (for `with_steps`) the step view.
pub fn failover_job(
    run: &RunRow,
    job: Option<&FailoverJobRow>,
    def: &Definition,
    journal: &[JournalEntry],
    with_steps: bool,
) -> pb::FailoverJob {
    let steps = steps(def, journal);
    let str_in = |k: &str| run.input.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
    pb::FailoverJob {
        job_id: run.id.to_string(),
        vm_id: job.map(|j| j.vm_id.clone()).unwrap_or_else(|| str_in("vm_id")),
        vm_name: job.and_then(|j| j.vm_name.clone()).unwrap_or_else(|| str_in("vm_name")),
        job_type: job.map(|j| j.job_type.clone()).unwrap_or_else(|| def.job_type.clone()),
        status: run.display_status.clone(),
        run_status: run.status.as_str().into(),
        progress_percent: progress(&run.state, &steps),
        current_step: run.current_step.clone().unwrap_or_default(),
        steps: if with_steps { steps } else { Vec::new() },
        snapshot_name: job.and_then(|j| j.linstor_snapshot_name.clone()).unwrap_or_default(),
        destination_vm_id: job.and_then(|j| j.destination_vm_id.clone()).unwrap_or_default(),
        network_mappings: job
            .and_then(|j| j.network_mappings.clone())
            .map(|m| m.into_iter().collect())
            .unwrap_or_default(),
        correlation_id: run.correlation_id.clone(),
        created_at: Some(timestamp(run.created_at)),
        started_at: run.started_at.map(timestamp),
        completed_at: run.completed_at.map(timestamp),
        cleanup_at: match &run.state {
            RunState::Holding { until } => until.map(timestamp),
            _ => None,
        },
        error: run_error(&run.state),
        created: true,
        last_sequence: run.last_seq,
        resolution: match &run.state {
            RunState::Resolved { resolution: r, .. } => Some(pb::Resolution {
                resolved_by: r.by.clone(),
                reason: r.reason.clone(),
                forced: r.forced,
                differences: r.differences.clone(),
                resolved_at: Some(timestamp(r.at)),
            }),
            _ => None,
        },
    }
}

pub fn vm(v: &VmRecord) -> pb::Vm {
    pb::Vm {
        vm_id: v.vm_id.clone(),
        name: v.name.clone(),
        cpu_count: v.cpu_count,
        memory_mb: v.memory_mb,
        os_type: v.os_type.clone(),
        nics: v
            .nics
            .iter()
            .map(|n| pb::Nic {
                source_network: n.source_network.clone(),
                mac: n.mac.clone().unwrap_or_default(),
                ip_address: n.ip.clone().unwrap_or_default(),
            })
            .collect(),
        volume_id: v.boot_disk.volume_id.clone(),
        oma_vm_id: v.oma_vm_id.clone(),
        last_sync_change_id: v.last_sync_change_id.clone().unwrap_or_default(),
        disks: v
            .disks()
            .into_iter()
            .map(|d| pb::Disk {
                volume_id: d.disk.volume_id,
                size_bytes: d.disk.size_bytes.unwrap_or(0),
                boot: d.boot,
                unit_number: d.disk.unit_number,
            })
            .collect(),
    }
}

fn non_empty(s: &str) -> Option<String> {
    Some(s.trim().to_string()).filter(|s| !s.is_empty())
}

/// The record of a `Vm` message; a problem with its disks names the field.
pub fn vm_record(v: &pb::Vm) -> Result<VmRecord, (String, String)> {
    let disks = v
        .disks
        .iter()
        .map(|d| ListedDisk {
            disk: Disk {
                volume_id: d.volume_id.trim().to_string(),
                size_bytes: Some(d.size_bytes).filter(|s| *s > 0),
                unit_number: d.unit_number,
            },
            boot: d.boot,
        })
        .collect();
    let (boot_disk, data_disks) = split_disks(disks, non_empty(&v.volume_id))?;
    Ok(VmRecord {
        vm_id: v.vm_id.trim().to_string(),
        name: v.name.clone(),
        cpu_count: v.cpu_count,
        memory_mb: v.memory_mb,
        os_type: v.os_type.clone(),
        nics: v
            .nics
            .iter()
            .map(|n| Nic {
                source_network: n.source_network.clone(),
                mac: non_empty(&n.mac),
                ip: non_empty(&n.ip_address),
            })
            .collect(),
        boot_disk,
        data_disks,
        oma_vm_id: v.oma_vm_id.clone(),
        last_sync_change_id: non_empty(&v.last_sync_change_id),
    })
}

pub fn network_kind(s: &str) -> Option<NetworkKind> {
    match s {
        "test" => Some(NetworkKind::Test),
        "production" | "live" => Some(NetworkKind::Production),
        _ => None,
    }
}

pub fn mapping(m: &NetworkMapping) -> pb::NetworkMapping {
    pb::NetworkMapping {
        source_network: m.source_network.clone(),
        destination_network_id: m.destination_network_id.clone(),
        kind: m.kind.as_str().into(),
    }
}

pub fn readiness(r: &ReadinessReport) -> pb::ReadinessReport {
    pb::ReadinessReport {
        vm_id: r.vm_id.clone(),
        is_ready: r.is_ready,
        readiness_score: r.readiness_score,
        checks: r
            .checks
            .iter()
            .map(|c| pb::ReadinessCheck {
                check_name: c.check_name.clone(),
                check_type: match c.check_type {
                    CheckType::Critical => "critical",
                    CheckType::Warning => "warning",
                }
                .into(),
                status: match c.status {
                    CheckStatus::Pass => "pass",
                    CheckStatus::Fail => "fail",
                }
                .into(),
                message: c.message.clone(),
                details_json: json_text(&c.details),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::RunId;

    const DEF: &str = r#"
name = "t"
[[step]]
name = "a"
action = "noop"
compensate = "noop"
[[step]]
name = "b"
action = "noop"
compensate = "noop"
skip_if = "skip_b"
[[step]]
name = "c"
action = "noop"
compensate = "noop"
[hold]
signal = "end-test"
[[teardown]]
name = "z"
action = "noop"
"#;

    fn journal(records: Vec<Record>) -> Vec<JournalEntry> {
        let run = RunId::new();
        records
            .into_iter()
            .enumerate()
            .map(|(i, record)| JournalEntry {
                run_id: run,
                seq: i as i64 + 1,
                record,
                at: Timestamp(1_000 * (i as i64 + 1)),
            })
            .collect()
    }

    #[test]
    fn steps_fold_from_the_journal_with_rollbacks_and_progress() {
        let def = crate::workflow::parse("t.toml", DEF, &|_| true).unwrap();
        let err = StepError::retryable("VM_CREATE_FAILED", "530");
        let started = |step: &str, attempt| Record::StepStarted {
            phase: Phase::Forward,
            step: step.into(),
            attempt,
            idempotency_key: String::new(),
        };
        let j = journal(vec![
            started("a", 1),
            Record::StepSucceeded {
                phase: Phase::Forward,
                step: "a".into(),
                attempt: 1,
                output: Value::Null,
            },
            Record::StepSkipped {
                phase: Phase::Forward,
                step: "b".into(),
                reason: "skip_b".into(),
            },
            started("c", 1),
            Record::StepFailed {
                phase: Phase::Forward,
                step: "c".into(),
                attempt: 1,
                error: err.clone(),
                retry_at: Some(Timestamp(9_000)),
            },
        ]);
        let s = steps(&def, &j);
        let view: Vec<(&str, &str, &str, u32)> = s
            .iter()
            .map(|s| (s.name.as_str(), s.phase.as_str(), s.status.as_str(), s.attempt))
            .collect();
        assert_eq!(
            view,
            vec![
                ("a", "forward", "completed", 1),
                ("b", "forward", "skipped", 0),
                ("c", "forward", "retrying", 1),
                ("z", "teardown", "pending", 0),
            ]
        );
        assert_eq!(s[0].started_at, Some(timestamp(Timestamp(1_000))));
        assert_eq!(s[0].completed_at, Some(timestamp(Timestamp(2_000))));
        assert_eq!(s[2].error.as_ref().map(|e| e.code.as_str()), Some("VM_CREATE_FAILED"));
        assert!(s[2].completed_at.is_none());
        assert_eq!(progress(&RunState::Pending, &s), 50, "a done, b skipped, of 4");

        // The retry starts: the error clears; then a permanent failure and the undo of a.
        let mut more = j.clone();
        more.extend(journal(vec![
            started("c", 2),
            Record::StepFailed {
                phase: Phase::Forward,
                step: "c".into(),
                attempt: 2,
                error: StepError::permanent("VM_CREATE_FAILED", "no"),
                retry_at: None,
            },
            Record::CompensationStarted {
                step: "a".into(),
                attempt: 1,
                idempotency_key: String::new(),
            },
            Record::CompensationSucceeded {
                step: "a".into(),
                attempt: 1,
            },
        ]));
        let s = steps(&def, &more);
        assert_eq!((s[2].status.as_str(), s[2].attempt), ("failed", 2));
        assert!(s[2].completed_at.is_some());
        assert_eq!(
            s[2].started_at,
            Some(timestamp(Timestamp(4_000))),
            "first attempt's start"
        );
        let undo = s.last().unwrap();
        assert_eq!(
            (undo.name.as_str(), undo.phase.as_str(), undo.status.as_str()),
            ("a", "rollback", "completed")
        );
        assert_eq!(progress(&RunState::Completed, &s), 100);
    }

    #[test]
    fn timestamps_round_trip_including_before_the_epoch() {
        for ms in [0, 1, 999, 1_700_000_000_123, -1, -1001] {
            let t = timestamp(Timestamp(ms));
            assert!((0..1_000_000_000).contains(&t.nanos));
            assert_eq!(from_timestamp(&t), Timestamp(ms));
        }
    }
}
