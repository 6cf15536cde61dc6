//! A run's persisted vocabulary: its state, status, journal records and idempotency keys.
//!
//! The store writes these, the engine's state machine produces them, the API and the CLI read
//! them; none of them needs the engine to do so.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{RunId, StepError, Timestamp};

/// Which list a step belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// The bring-up steps; rolled back by their compensations on failure or cancel.
    Forward,
    /// The steps after the hold that return the world to where it started.
    Teardown,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Forward => "forward",
            Phase::Teardown => "teardown",
        }
    }
}

/// Why a run is rolling back; decides its terminal state once the rollback is done.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Cause {
    Failed { step: String, error: StepError },
    Cancelled { reason: String },
}

/// The persisted state of a run. Each variant carries only its own data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum RunState {
    /// Submitted; nothing started. Left by the first worker that claims it (`Begin`) or by `Cancel`.
    Pending,
    /// Attempt `attempt` of a step is committed as started; its side effect may be in flight.
    /// Left by the step's result, or by `Resume` when a worker re-claims it after a crash.
    Running { phase: Phase, step: usize, attempt: u32 },
    /// Attempt `attempt - 1` failed with a retryable error; asleep in the database until `at`,
    /// when a worker's `WakeUp` starts attempt `attempt`.
    Backoff {
        phase: Phase,
        step: usize,
        attempt: u32,
        at: Timestamp,
    },
    /// Forward steps done; waiting for the hold's signal or its timer (`until`), whichever is first.
    Holding { until: Option<Timestamp> },
    /// Undoing forward step `step` (its compensation, attempt `attempt`) because of `cause`.
    Compensating { step: usize, attempt: u32, cause: Cause },
    /// A compensation attempt failed with a retryable error; asleep until `at`.
    CompensationBackoff {
        step: usize,
        attempt: u32,
        at: Timestamp,
        cause: Cause,
    },
    /// Every step (and the teardown, if any) succeeded. Terminal.
    Completed,
    /// A step failed permanently and every completed step was undone. Terminal.
    Failed { step: String, error: StepError },
    /// Cancelled and every completed step was undone. Terminal.
    Cancelled { reason: String },
    /// Something could not be undone (a compensation or teardown step exhausted its retries,
    /// or an irreversible step was reached). `undone` lists what is left. Terminal.
    NeedsOperator {
        step: String,
        error: StepError,
        undone: Vec<String>,
    },
    /// An operator put right what a `NeedsOperator` run left (or accepted it as it is) and said
    /// so: the run's resources (a failover's VM) are free again. Keeps what the run left, for
    /// the record. Terminal.
    Resolved {
        step: String,
        error: StepError,
        undone: Vec<String>,
        resolution: Resolution,
    },
}

/// Who resolved a `NeedsOperator` run, why, and what still differed from the starting point
/// when they did (empty unless `forced`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resolution {
    pub by: String,
    pub reason: String,
    /// Resolved although the world still differed (the differences are listed).
    pub forced: bool,
    pub differences: Vec<String>,
    pub at: Timestamp,
}

/// The coarse status column that workers and filters use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Pending,
    Running,
    Sleeping,
    Holding,
    Compensating,
    Completed,
    Failed,
    Cancelled,
    NeedsOperator,
    Resolved,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Pending => "pending",
            RunStatus::Running => "running",
            RunStatus::Sleeping => "sleeping",
            RunStatus::Holding => "holding",
            RunStatus::Compensating => "compensating",
            RunStatus::Completed => "completed",
            RunStatus::Failed => "failed",
            RunStatus::Cancelled => "cancelled",
            RunStatus::NeedsOperator => "needs_operator",
            RunStatus::Resolved => "resolved",
        }
    }

    pub fn parse(s: &str) -> Option<RunStatus> {
        Some(match s {
            "pending" => RunStatus::Pending,
            "running" => RunStatus::Running,
            "sleeping" => RunStatus::Sleeping,
            "holding" => RunStatus::Holding,
            "compensating" => RunStatus::Compensating,
            "completed" => RunStatus::Completed,
            "failed" => RunStatus::Failed,
            "cancelled" => RunStatus::Cancelled,
            "needs_operator" => RunStatus::NeedsOperator,
            "resolved" => RunStatus::Resolved,
            _ => return None,
        })
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            RunStatus::Completed
                | RunStatus::Failed
                | RunStatus::Cancelled
                | RunStatus::NeedsOperator
                | RunStatus::Resolved
        )
    }
}

impl RunState {
    pub fn status(&self) -> RunStatus {
        match self {
            RunState::Pending => RunStatus::Pending,
            RunState::Running { .. } => RunStatus::Running,
            RunState::Backoff { .. } => RunStatus::Sleeping,
            RunState::Holding { .. } => RunStatus::Holding,
            RunState::Compensating { .. } | RunState::CompensationBackoff { .. } => RunStatus::Compensating,
            RunState::Completed => RunStatus::Completed,
            RunState::Failed { .. } => RunStatus::Failed,
            RunState::Cancelled { .. } => RunStatus::Cancelled,
            RunState::NeedsOperator { .. } => RunStatus::NeedsOperator,
            RunState::Resolved { .. } => RunStatus::Resolved,
        }
    }

    pub fn is_terminal(&self) -> bool {
        self.status().is_terminal()
    }

    /// When a worker should next pick this run up. `None` means only a signal or cancel
    /// wakes it (a hold without a timer) or never (terminal). Running and compensating runs
    /// are due at once, which is what lets another worker take them over when a lease expires.
    pub fn wake_at(&self, now: Timestamp) -> Option<Timestamp> {
        match self {
            RunState::Pending | RunState::Running { .. } | RunState::Compensating { .. } => Some(now),
            RunState::Backoff { at, .. } | RunState::CompensationBackoff { at, .. } => Some(*at),
            RunState::Holding { until } => *until,
            RunState::Completed
            | RunState::Failed { .. }
            | RunState::Cancelled { .. }
            | RunState::NeedsOperator { .. }
            | RunState::Resolved { .. } => None,
        }
    }

    /// Whether the run is waiting for a named signal now (signals wait in the database otherwise).
    pub fn accepts_signals(&self) -> bool {
        matches!(self, RunState::Holding { .. })
    }
}

/// One journal entry: the append-only audit trail of a run. Every transition writes at least one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Record {
    RunSubmitted {
        definition: String,
        definition_hash: String,
        input: Value,
        /// The principal that submitted it (None: no authenticated caller, e.g. `tern admin`
        /// or a server without authentication; runs journaled before principals existed).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by: Option<String>,
    },
    StepSkipped {
        phase: Phase,
        step: String,
        reason: String,
    },
    StepStarted {
        phase: Phase,
        step: String,
        attempt: u32,
        idempotency_key: String,
    },
    StepProgress {
        phase: Phase,
        step: String,
        attempt: u32,
        data: Value,
    },
    StepSucceeded {
        phase: Phase,
        step: String,
        attempt: u32,
        output: Value,
    },
    /// `retry_at` is set when another attempt is scheduled; `None` means the step failed permanently.
    StepFailed {
        phase: Phase,
        step: String,
        attempt: u32,
        error: StepError,
        retry_at: Option<Timestamp>,
    },
    CompensationStarted {
        step: String,
        attempt: u32,
        idempotency_key: String,
    },
    CompensationProgress {
        step: String,
        attempt: u32,
        data: Value,
    },
    CompensationSucceeded {
        step: String,
        attempt: u32,
    },
    CompensationFailed {
        step: String,
        attempt: u32,
        error: StepError,
        retry_at: Option<Timestamp>,
    },
    TimerSet {
        at: Timestamp,
    },
    TimerFired {
        at: Timestamp,
    },
    /// `applied` is false when the run was not waiting for that signal.
    SignalReceived {
        name: String,
        applied: bool,
        /// The principal that sent it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by: Option<String>,
    },
    /// `applied` is false when the run was already rolling back or tearing down.
    CancelRequested {
        reason: String,
        applied: bool,
        /// The principal that asked for it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by: Option<String>,
    },
    RunFinished {
        status: RunStatus,
        error: Option<StepError>,
        undone: Vec<String>,
    },
    /// An operator resolved a `needs_operator` run.
    Resolved {
        by: String,
        reason: String,
        forced: bool,
        differences: Vec<String>,
    },
}

impl Record {
    pub fn kind(&self) -> &'static str {
        match self {
            Record::RunSubmitted { .. } => "run_submitted",
            Record::StepSkipped { .. } => "step_skipped",
            Record::StepStarted { .. } => "step_started",
            Record::StepProgress { .. } => "step_progress",
            Record::StepSucceeded { .. } => "step_succeeded",
            Record::StepFailed { retry_at: Some(_), .. } => "step_retry_scheduled",
            Record::StepFailed { retry_at: None, .. } => "step_failed",
            Record::CompensationStarted { .. } => "compensation_started",
            Record::CompensationProgress { .. } => "compensation_progress",
            Record::CompensationSucceeded { .. } => "compensation_succeeded",
            Record::CompensationFailed { .. } => "compensation_failed",
            Record::TimerSet { .. } => "timer_set",
            Record::TimerFired { .. } => "timer_fired",
            Record::SignalReceived { .. } => "signal_received",
            Record::CancelRequested { .. } => "cancel_requested",
            Record::RunFinished { .. } => "run_finished",
            Record::Resolved { .. } => "resolved",
        }
    }
}

/// The stable idempotency key of a step: the same for every attempt of that step in that run.
pub fn idempotency_key(run_id: RunId, phase: Phase, step: &str) -> String {
    match phase {
        Phase::Forward => format!("{run_id}/{step}"),
        Phase::Teardown => format!("{run_id}/teardown/{step}"),
    }
}

/// The stable idempotency key of a step's compensation.
pub fn undo_key(run_id: RunId, step: &str) -> String {
    format!("{run_id}/{step}/undo")
}

/// What a run keeps between steps, by step name: each step's output (what it created), and the
/// progress a step or a compensation checkpointed in the middle (e.g. a job id it waits on).
/// Folded from the journal, so compensations and resumed attempts never depend on memory.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunContext {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub outputs: BTreeMap<String, Value>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub progress: BTreeMap<String, Value>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub undo_progress: BTreeMap<String, Value>,
}

static NOTHING: Value = Value::Null;

impl RunContext {
    /// A step's output, or null.
    pub fn output(&self, step: &str) -> &Value {
        self.outputs.get(step).unwrap_or(&NOTHING)
    }

    /// The progress a step checkpointed, or null.
    pub fn progress_of(&self, step: &str) -> &Value {
        self.progress.get(step).unwrap_or(&NOTHING)
    }

    /// Folds journal records in. Returns whether anything changed.
    pub fn apply(&mut self, records: &[Record]) -> bool {
        let mut changed = false;
        for r in records {
            let (table, key, value) = match r {
                Record::StepSucceeded { step, output, .. } => (&mut self.outputs, step, output),
                Record::StepProgress { step, data, .. } => (&mut self.progress, step, data),
                Record::CompensationProgress { step, data, .. } => (&mut self.undo_progress, step, data),
                Record::RunSubmitted { .. }
                | Record::StepSkipped { .. }
                | Record::StepStarted { .. }
                | Record::StepFailed { .. }
                | Record::CompensationStarted { .. }
                | Record::CompensationSucceeded { .. }
                | Record::CompensationFailed { .. }
                | Record::TimerSet { .. }
                | Record::TimerFired { .. }
                | Record::SignalReceived { .. }
                | Record::CancelRequested { .. }
                | Record::RunFinished { .. }
                | Record::Resolved { .. } => continue,
            };
            table.insert(key.clone(), value.clone());
            changed = true;
        }
        changed
    }

    /// Reads a stored context; a null or empty one is empty.
    pub fn from_value(v: Value) -> Result<RunContext, serde_json::Error> {
        match v {
            Value::Null => Ok(RunContext::default()),
            v => serde_json::from_value(v),
        }
    }
}
