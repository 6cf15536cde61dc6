//! The pure state machine of a run: `(state, event, now) -> (state, records, action)`.
//!
//! No I/O, no clock, no randomness: `now` is passed in and retry jitter is derived from a
//! hash of (run, step, attempt). The driver commits the returned state and journal records
//! in one transaction, and only then carries out the action ("commit first, then act").
//!
//! [`Machine::transition`] is the table: every declared (state, event) pair and the handler
//! of that edge, then the pairs that are not declared, each a typed [`TransitionError::Invalid`].
//! Terminal states absorb late events explicitly. The handlers live beside it: `steps.rs`
//! (attempts of forward and teardown steps), `hold.rs` and `rollback.rs` (cancel and
//! compensations).

mod hold;
mod rollback;
mod steps;
#[cfg(test)]
mod tests;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::domain::run::{Phase, Record, Resolution, RunState, RunStatus};
use crate::domain::{RunId, StepError, Timestamp};
use crate::workflow::{Definition, StepDef};

/// A definition and a run's input: everything the transition function reads besides the state.
pub struct Machine<'a> {
    pub run_id: RunId,
    pub def: &'a Definition,
    pub input: &'a Value,
}

type Result<T> = std::result::Result<T, TransitionError>;

impl Machine<'_> {
    /// The transition table: the declared edges state by state, each with its handler, then the
    /// pairs that are not declared, grouped by why.
    // A table is read by its lines: rustfmt would spread each struct pattern over several.
    #[rustfmt::skip]
    pub fn transition(&self, state: &RunState, event: &Event, now: Timestamp) -> Result<Transition> {
        use Event as E;
        use Phase::{Forward, Teardown};
        use RunState as S;
        let invalid = || Err(TransitionError::Invalid { state: state_name(state), event: event.name() });
        match (state, event) {
            (S::Pending, E::Begin) => self.on_begin(now),
            (S::Pending, E::Cancel { reason, by }) => self.on_cancel_pending(reason, by),

            (S::Running { phase, step, attempt }, E::StepSucceeded { output }) =>
                self.on_step_succeeded(*phase, *step, *attempt, output, now),
            (S::Running { phase, step, attempt }, E::StepFailed { error }) =>
                self.on_step_failed(*phase, *step, *attempt, error, now),
            (S::Running { phase, step, attempt }, E::Progress { data }) =>
                self.on_step_progress(*phase, *step, *attempt, data),
            (S::Running { phase, step, attempt }, E::Resume) => self.on_step_resume(*phase, *step, *attempt),
            // The step was started, so it may have acted: its own undo runs first.
            (S::Running { phase: Forward, step, .. }, E::Cancel { reason, by }) =>
                self.on_cancel(Some(*step), reason, by),
            (S::Running { phase: Teardown, .. }, E::Cancel { reason, by }) => self.on_cancel_absorbed(state, reason, by),

            (S::Backoff { phase, step, attempt, at }, E::WakeUp) =>
                self.on_retry_due(*phase, *step, *attempt, *at, now),
            (S::Backoff { phase: Forward, step, .. }, E::Cancel { reason, by }) =>
                self.on_cancel(Some(*step), reason, by),
            (S::Backoff { phase: Teardown, .. }, E::Cancel { reason, by }) => self.on_cancel_absorbed(state, reason, by),

            (S::Holding { until: Some(at) }, E::WakeUp) => self.on_hold_timer(*at, now),
            (S::Holding { .. }, E::Signal { name, by }) => self.on_signal(state, name, by, now),
            // Every forward step is done: the rollback starts from the last.
            (S::Holding { .. }, E::Cancel { reason, by }) =>
                self.on_cancel(self.def.steps.len().checked_sub(1), reason, by),

            (S::Compensating { step, attempt, cause }, E::StepSucceeded { .. }) =>
                self.on_compensation_succeeded(*step, *attempt, cause),
            (S::Compensating { step, attempt, cause }, E::StepFailed { error }) =>
                self.on_compensation_failed(*step, *attempt, cause, error, now),
            (S::Compensating { step, attempt, cause }, E::Progress { data }) =>
                self.on_compensation_progress(*step, *attempt, cause, data),
            (S::Compensating { step, attempt, cause }, E::Resume) =>
                self.on_compensation_resume(*step, *attempt, cause),
            (S::Compensating { .. }, E::Cancel { reason, by }) => self.on_cancel_absorbed(state, reason, by),

            (S::CompensationBackoff { step, attempt, at, cause }, E::WakeUp) =>
                self.on_compensation_retry_due(*step, *attempt, *at, cause, now),
            (S::CompensationBackoff { .. }, E::Cancel { reason, by }) => self.on_cancel_absorbed(state, reason, by),

            (S::NeedsOperator { step, error, undone }, E::Resolve { resolution }) =>
                Ok(resolved(step, error, undone, resolution)),

            (
                S::Completed | S::Failed { .. } | S::Cancelled { .. } | S::NeedsOperator { .. } | S::Resolved { .. },
                E::Begin | E::Resume | E::StepSucceeded { .. } | E::StepFailed { .. } | E::Progress { .. }
                | E::WakeUp | E::Signal { .. } | E::Cancel { .. },
            ) => self.on_late_event(state),

            // Not declared. Only a pending run begins.
            (
                S::Running { .. } | S::Backoff { .. } | S::Holding { .. } | S::Compensating { .. }
                | S::CompensationBackoff { .. },
                E::Begin,
            ) => invalid(),
            // Results, progress and resume need an attempt in flight.
            (
                S::Pending | S::Backoff { .. } | S::Holding { .. } | S::CompensationBackoff { .. },
                E::Resume | E::StepSucceeded { .. } | E::StepFailed { .. } | E::Progress { .. },
            ) => invalid(),
            // Only a run asleep until a set time wakes up.
            (S::Pending | S::Running { .. } | S::Holding { until: None } | S::Compensating { .. }, E::WakeUp) =>
                invalid(),
            // Only a run that needs an operator is resolved: one in progress is Tern's to finish,
            // and a run that ended on its own (or was resolved already) left nothing to resolve.
            (
                S::Pending | S::Running { .. } | S::Backoff { .. } | S::Holding { .. } | S::Compensating { .. }
                | S::CompensationBackoff { .. } | S::Completed | S::Failed { .. } | S::Cancelled { .. }
                | S::Resolved { .. },
                E::Resolve { .. },
            ) => invalid(),
            // Only a holding run takes signals.
            (
                S::Pending | S::Running { .. } | S::Backoff { .. } | S::Compensating { .. }
                | S::CompensationBackoff { .. },
                E::Signal { .. },
            ) => invalid(),
        }
    }

    fn step_def(&self, phase: Phase, step: usize) -> Result<&StepDef> {
        self.def
            .step(phase, step)
            .ok_or(TransitionError::NoSuchStep { phase, step })
    }

    fn step_name(&self, phase: Phase, step: usize) -> Result<String> {
        Ok(self.step_def(phase, step)?.name.clone())
    }

    /// A terminal state absorbs any late event: no journal entry, the run stays finished.
    fn on_late_event(&self, state: &RunState) -> Result<Transition> {
        Ok(Transition {
            state: state.clone(),
            records: vec![],
            action: Action::Finish,
        })
    }
}

/// Something that happened to a run, fed to [`Machine::transition`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A worker claimed a pending run.
    Begin,
    /// A worker claimed a run whose step or compensation was in flight when its previous
    /// worker died or lost its lease: start the next attempt.
    Resume,
    /// The running step (or compensation) returned successfully with this output.
    StepSucceeded { output: Value },
    /// The running step (or compensation) failed.
    StepFailed { error: StepError },
    /// The running step checkpointed progress (e.g. an external job id) in the middle.
    Progress { data: Value },
    /// The run's wake-up time arrived (retry backoff or hold timer).
    WakeUp,
    /// A named signal arrived (e.g. `end-test`), sent by `by`.
    Signal { name: String, by: Option<String> },
    /// Cancellation was requested, by `by`.
    Cancel { reason: String, by: Option<String> },
    /// An operator resolved a run that needs one (what they checked is in the resolution).
    Resolve { resolution: Resolution },
}

impl Event {
    fn name(&self) -> &'static str {
        match self {
            Event::Begin => "begin",
            Event::Resume => "resume",
            Event::StepSucceeded { .. } => "step_succeeded",
            Event::StepFailed { .. } => "step_failed",
            Event::Progress { .. } => "progress",
            Event::WakeUp => "wake_up",
            Event::Signal { .. } => "signal",
            Event::Cancel { .. } => "cancel",
            Event::Resolve { .. } => "resolve",
        }
    }
}

/// What the driver must do once the transition is committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Run attempt `attempt` of a step's action.
    Execute {
        phase: Phase,
        step: usize,
        attempt: u32,
        idempotency_key: String,
    },
    /// Run attempt `attempt` of forward step `step`'s compensation.
    Compensate {
        step: usize,
        attempt: u32,
        idempotency_key: String,
    },
    /// Nothing new to start: the attempt in flight, if any, carries on (a progress checkpoint,
    /// a cancel that changes nothing).
    Continue,
    /// Nothing to run now: release the run until its wake-up time (or a signal).
    Sleep,
    /// The run is terminal.
    Finish,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub state: RunState,
    pub records: Vec<Record>,
    pub action: Action,
}

impl Transition {
    fn with_leading(mut self, mut leading: Vec<Record>) -> Self {
        leading.append(&mut self.records);
        self.records = leading;
        self
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransitionError {
    #[error("event {event} is not allowed in state {state}")]
    Invalid { state: &'static str, event: &'static str },
    #[error("wake-up before the run is due (due at {due})")]
    NotDue { due: Timestamp },
    #[error("the definition has no {phase:?} step {step}: the run does not match its pinned definition")]
    NoSuchStep { phase: Phase, step: usize },
    #[error("input problem: {0}")]
    Input(String),
}

fn state_name(s: &RunState) -> &'static str {
    match s {
        RunState::Pending => "pending",
        RunState::Running { .. } => "running",
        RunState::Backoff { .. } => "backoff",
        RunState::Holding { .. } => "holding",
        RunState::Compensating { .. } => "compensating",
        RunState::CompensationBackoff { .. } => "compensation_backoff",
        RunState::Completed => "completed",
        RunState::Failed { .. } => "failed",
        RunState::Cancelled { .. } => "cancelled",
        RunState::NeedsOperator { .. } => "needs_operator",
        RunState::Resolved { .. } => "resolved",
    }
}

/// The operator's resolution of a `NeedsOperator` run: journaled, and the run keeps what it left.
fn resolved(step: &str, error: &StepError, undone: &[String], resolution: &Resolution) -> Transition {
    Transition {
        state: RunState::Resolved {
            step: step.to_string(),
            error: error.clone(),
            undone: undone.to_vec(),
            resolution: resolution.clone(),
        },
        records: vec![Record::Resolved {
            by: resolution.by.clone(),
            reason: resolution.reason.clone(),
            forced: resolution.forced,
            differences: resolution.differences.clone(),
        }],
        action: Action::Finish,
    }
}

/// A wake-up must not come before the time the run sleeps until.
fn due(at: Timestamp, now: Timestamp) -> Result<()> {
    match now < at {
        true => Err(TransitionError::NotDue { due: at }),
        false => Ok(()),
    }
}

fn finished(status: RunStatus, error: Option<StepError>, undone: Vec<String>) -> Record {
    Record::RunFinished { status, error, undone }
}

/// The run stops for a person: `step` failed with `error` (or cannot be undone) and `undone`
/// is what a rollback would still have to undo. `records` come before the run's end.
fn needs_operator(step: String, error: StepError, undone: Vec<String>, mut records: Vec<Record>) -> Transition {
    records.push(finished(RunStatus::NeedsOperator, Some(error.clone()), undone.clone()));
    Transition {
        state: RunState::NeedsOperator { step, error, undone },
        records,
        action: Action::Finish,
    }
}

/// `t` finishes the run while a cancel was pending that it does not deliver (it arrived while
/// the last step ran): the cancel is recorded as not applied, just before the run's end.
pub fn with_late_cancel(mut t: Transition, reason: &str, by: Option<&str>) -> Transition {
    let at = t
        .records
        .iter()
        .rposition(|r| matches!(r, Record::RunFinished { .. }))
        .unwrap_or(t.records.len());
    t.records.insert(
        at,
        Record::CancelRequested {
            reason: reason.to_string(),
            applied: false,
            by: by.map(str::to_string),
        },
    );
    t
}
